"""Input/output: image decoding, shards (webdataset + fsspec), latent store, manifests. No Ray here."""
