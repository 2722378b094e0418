"""The worker runtime: what a cluster worker runs between the master's fork and its exit.

``workers`` itself is the socketserver API (servers, mix-ins, handlers), importable alone as
``import workers as socketserver``. This package is the other half, which only the cluster
uses. Its modules, in the order a worker's life goes, each importing only those above it:

- ``spec``: what the master hands a worker (``WorkerSpec``, ``Endpoint``) and the signal
  contract between them;
- ``scoreboard``: the shared-memory slot a worker writes and the master reads;
- ``escalation``: the hung-request sequence (stack dump, TERM, KILL) and the overdue test,
  shared by the master (hung workers) and fork mode (hung request children);
- ``lifecycle``: the signal flags and wakeup pipe, and the checks that the master still lives;
- ``context``: what a mode needs at run time besides its servers (notify, ready, counting);
- ``proxyproto`` and ``gate``: the PROXY protocol parser (pure), and the access rules a
  listener's server applies (the allow lists, the PROXY header read) with their counting;
- ``accept``: the accept discipline every mode shares (``AcceptLoop``);
- ``mode`` and ``modes``: the record of a mode, and the one registry of modes, one module each;
- ``entry``: the entry point ``run(spec)``: boot, load the app, serve in the spec's mode.
"""
