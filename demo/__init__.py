"""`velocity demo`: the seed's fraud story told end to end on real Kafka and Redis (SPEC section 9).

- `demo.story`     — the story as data: the rule that picks its four cards, its transactions, its verdict
- `demo.runner`    — the stages (services, history, snapshots, training, worker and API, story, checks)
- `demo.processes` — the worker and API subprocesses, their logs, stopping them
- `demo.cli`       — the `velocity demo` command
"""
