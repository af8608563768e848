"""The routing model: pure decision logic shared by the live router, its standby and the simulator.

:class:`~router.model.model.RoutingModel` (with :mod:`~router.model.sync`, :mod:`~router.model.table`),
the policies (:mod:`~router.model.policies`, :mod:`~router.model.baselines`), their settings
(:mod:`~router.model.config`) and a standby's decision mirror (:mod:`~router.model.mirror`). No I/O.
"""
