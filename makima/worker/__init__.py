"""The worker side of makima: ``makima daemon run``.

Speaks only the daemon websocket protocol (``protocol.md``) and the REST API,
never Django, so that it runs on machines without the server's settings or
database. Modules:

- ``base``: the shapes shared by the parts below (task, worktree, agent result);
- ``daemon``: the websocket client (hello, heartbeats, commands, reports);
- ``spool``: reports kept on disk until the server has stored them;
- ``runner``: one task from worktree to report;
- ``git``: mirror clones and worktrees;
- ``verifiers``: test commands run after the agent;
- ``process``: agent subprocesses (streamed output, interrupt, timeout);
- ``agents``: ``claude``, ``command`` and ``scripted``.
"""
