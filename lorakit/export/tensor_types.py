"""Which GGUF type each tensor gets for a `quant` (shared by the writer and its verification).

f16 / bf16: every matrix in that type; q8_0: every matrix Q8_0; q4_0: the blocks' matrices Q4_0, the token
embeddings and the output head Q8_0. 1-D tensors stay F32; a matrix whose rows are not whole quant blocks
falls back to F16.
"""

from __future__ import annotations

import gguf

QT = gguf.GGMLQuantizationType
MATRIX_TYPE = {"f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
EMBEDDING_TYPE = {"f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q8_0}


def tensor_type(shape: tuple, quant: str, embedding: bool) -> QT:
    """The GGUF type of a tensor of `shape` in a `quant` file (`embedding`: token embeddings or output head)."""
    if len(shape) < 2:
        return QT.F32
    qtype = (EMBEDDING_TYPE if embedding else MATRIX_TYPE)[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else QT.F16
