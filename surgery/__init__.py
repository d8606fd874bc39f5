"""Cross-tokenizer model surgery: vocabulary alignment, transplantation, distillation, byte-level LMs."""

import os

__version__ = "0.1.0"

# Large CPU tensors on transparent huge pages (PyTorch's allocator advises them when this is set before
# torch starts): first-touch page faults dominate fresh multi-GB allocations, and huge pages make an
# 8B checkpoint's embedding work about 3x faster on this project's machines. A user's own setting wins;
# it has no effect when torch was imported before this package.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
