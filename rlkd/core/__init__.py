"""The neutral core that the trainer, ``rlkd inspect`` and evaluation share; it imports no stage.

- :mod:`~rlkd.core.targets`: :class:`~rlkd.core.targets.TeacherTargets` (the cached teacher at the positions being
  scored) and :func:`~rlkd.core.targets.collate`, the one step from cache rows to model inputs plus targets;
- :mod:`~rlkd.core.sparse`: the student and the teacher on the cached ids plus a tail bucket (the fused
  vocabulary pass and the sparse forward KL), used by the losses and the metrics alike;
- :mod:`~rlkd.core.metrics`: the peak-agreement metrics (CR@k, OR@k / MOR@k, set@k) with one scoring function.

Dependencies run one way: ``trainer -> core``, ``inspect -> core``, ``core -> cache``.
"""
