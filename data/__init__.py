"""Training data: shard writing, offline encoding, and the streaming loader.

    sources   input formats of prepare-data (authors' JSON, image folder, img2dataset)
    write     filtered, resized shards + manifest.json, resumable after a crash
    encode    VAE latents and FLUX / SD3 text embeddings into encoded shards
    prepare   the `senseflow prepare-data` command
    loader    ShardLoader: DP-sharded, shuffled, resumable batches
    shards    tar reading/writing, manifests, resumable output folders
    decode    one sample -> arrays, with the checks that turn bad data into counted skips
    imageops  image bounds, resize + centre crop, aspect buckets
    bad       the skip reasons and their counting + logging
"""
