"""The distributed pipeline on Ray: the ONLY package of dclip-ray that imports ``ray``.

- :mod:`.runtime`: ``ray.init`` embedded by default, or a cluster via ``--address`` / ``RAY_ADDRESS``;
- :mod:`.precompute`: Ray tasks, one per input shard, caching DDIM latents;
- :mod:`.finetune_many`: one Ray Train ``TorchTrainer`` per prompt line, several at once;
- :mod:`.restyle`: Ray Data streaming over shards with an actor pool of generator workers;
- :mod:`.verify`: exactly-once checks of an output folder against its input (no Ray needed);
- :mod:`.work`: the per-shard units of work (no Ray), idempotent, commit marker last.

Importing this package does not import ray; the Ray modules do.
"""
