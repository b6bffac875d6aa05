"""The federated job's phases, one module each, in the order the driver (``server/job.py``)
runs them: ``enrolment`` (who the sites are; membership before every round), ``fingerprint``
(the federated fingerprint sum), ``planning`` (the nnU-Net plan from it, or the job's fixed
plan), ``initial_model`` (the untrained network's weights), ``preprocess`` (the sites prepare
their data for the plan), ``training`` (one round), ``evaluation`` (per-site and pooled scores,
the final evaluation) and ``finish`` (model bundle and report). Each takes the job's
:class:`~fedseg.server.job_context.JobContext`; the secure-aggregation versions of the
fingerprint sum, the round and the final evaluation are ``server/secure_rounds.py``.
"""
