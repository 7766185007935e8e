"""The distributed pipeline on Ray: the ONLY package of dclip-ray that imports ``ray``.

- :mod:`.runtime`: ``ray.init`` embedded by default, or a cluster via ``--address`` / ``RAY_ADDRESS``;
- :mod:`.precompute`: Ray tasks, one per input shard, caching DDIM latents;
- :mod:`.finetune_many`: one Ray Train ``TorchTrainer`` per prompt line, several at once;
- :mod:`.restyle`: Ray Data streaming over shards with an actor pool of generator workers;
- :mod:`.submit`: a workflow submitted to a cluster as a Ray Job;
- :mod:`.workflow_run`: a workflow spec's stages in order.

The per-shard work these modules schedule is Ray-free and lives in :mod:`dclip_ray.stages`.

Importing this package does not import ray; the Ray modules do.
"""
