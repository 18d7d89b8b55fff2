"""Element types: safetensors' dtype codes, torch.save's storage classes and torch dtypes, in one table.

safetensors codes from its format description; a code torch (of the installed version) has no dtype
for maps to None but keeps its item size, so a header holding it is still checked for consistency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ElementType:
    code: str  # safetensors' name
    itemsize: int  # bytes
    torch: torch.dtype | None  # None: this torch has no such dtype


def _t(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


ELEMENT_TYPES: tuple[ElementType, ...] = (
    ElementType("F64", 8, torch.float64), ElementType("F32", 4, torch.float32),
    ElementType("F16", 2, torch.float16), ElementType("BF16", 2, torch.bfloat16),
    ElementType("F8_E4M3", 1, _t("float8_e4m3fn")), ElementType("F8_E5M2", 1, _t("float8_e5m2")),
    ElementType("I64", 8, torch.int64), ElementType("I32", 4, torch.int32), ElementType("I16", 2, torch.int16),
    ElementType("I8", 1, torch.int8), ElementType("U64", 8, _t("uint64")), ElementType("U32", 4, _t("uint32")),
    ElementType("U16", 2, _t("uint16")), ElementType("U8", 1, torch.uint8), ElementType("BOOL", 1, torch.bool),
)
BY_CODE: dict[str, ElementType] = {e.code: e for e in ELEMENT_TYPES}
_BY_TORCH: dict[torch.dtype, ElementType] = {e.torch: e for e in ELEMENT_TYPES if e.torch is not None}

# torch.save's pickle names a storage by class (legacy typed storages, still what it writes).
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def torch_dtype(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors code; None when unknown or absent from this torch."""
    e = BY_CODE.get(code)
    return None if e is None else e.torch


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (KeyError for one safetensors cannot hold, e.g. complex)."""
    return _BY_TORCH[dtype].code


def nbytes(shape, itemsize: int) -> int:
    n = itemsize
    for d in shape:
        n *= int(d)
    return n
