"""The per-shard work of every stage, free of Ray (the layering test checks it): :mod:`dclip_ray.pipeline`
only schedules these functions on Ray, and ``dclip-ray edit`` runs restyle in-process.

- :mod:`.inputs`: input shards, their names, fingerprints and decoded records;
- :mod:`.checks`: step and location checks every stage runs before any work;
- :mod:`.common`: the per-shard result dataclasses, counted network calls, leases reported;
- :mod:`.precompute`: one input shard -> cached latents;
- :mod:`.training_data`: the images and latents a fine-tuning run trains on;
- :mod:`.restyle`: one input shard -> edited output shards (:class:`.restyle.ShardRestyler`);
- :mod:`.restyle_config`: restyle options -> config, checks, latent coverage, ``--dry-run`` plan;
- :mod:`.verify`: exactly-once checks of an output folder against its input.

Every write is idempotent (deterministic names, commit marker last).
"""
