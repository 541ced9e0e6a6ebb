"""Images and captions in: datasets as shards (dataset), --data resolution (readers), named sets (named),
image-caption pairs (pairs), WordNet (wordnet)."""
from .dataset import (DECODE_VERSION, IMAGE_EXTS, ImageDataset, Shard, dataset_rows, decode_image, images_at,
                      iter_images, iter_shard, tar_members, to_arrays, to_rgb)
from .named import NAMED_SETS, sample_photos
from .pairs import flickr8k_captions, read_flickr8k, read_pairs
from .readers import expand_shards, load_dataset, read_class_file

__all__ = ["DECODE_VERSION", "IMAGE_EXTS", "ImageDataset", "NAMED_SETS", "Shard", "dataset_rows", "decode_image",
           "expand_shards", "flickr8k_captions", "images_at", "iter_images", "iter_shard", "load_dataset",
           "read_class_file", "read_flickr8k",
           "read_pairs", "sample_photos", "tar_members", "to_arrays", "to_rgb"]
