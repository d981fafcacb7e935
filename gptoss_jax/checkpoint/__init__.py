"""Reading and writing the two public checkpoint layouts (docs/spec.md, "Checkpoint layouts") with safetensors.

layout    which checkpoint tensors hold each parameter (shapes from the model's abstract state); finding a folder's
          layout
files     reading safetensors files, every failure a CheckpointError naming the file and the tensor
validate  a folder's tensor names, shapes and dtypes against its config, before any data is read
experts   the expert matrices between MXFP4 and dense storage, a region at a time (loading and saving)
load      `load_model`: one path for one device and for a mesh, each device's slice read alone
save      `save_checkpoint`: atomic, sharded writing
convert   `convert_checkpoint`: another layout, file to file
random    `write_random_checkpoint`: random weights of any size, a layer at a time
"""

from gptoss_jax.checkpoint.convert import convert_checkpoint
from gptoss_jax.checkpoint.files import CheckpointError
from gptoss_jax.checkpoint.layout import INDEX_FILE, Format, Layout, find_layout, tensor_rules
from gptoss_jax.checkpoint.load import load_model
from gptoss_jax.checkpoint.random import write_random_checkpoint
from gptoss_jax.checkpoint.save import save_checkpoint

__all__ = ["INDEX_FILE", "CheckpointError", "Format", "Layout", "convert_checkpoint", "find_layout", "load_model",
           "save_checkpoint", "tensor_rules", "write_random_checkpoint"]
