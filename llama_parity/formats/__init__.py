"""The file formats, read and written in one place: safetensors (header, index, tensor rows), torch.save's
`.pth` zip (records, pickle metadata), llama.cpp's GGUF (header, tensor rows; read only), positioned
reads, and one table of element types.

Neutral ground: the converter and the judge (verify, streaming, reference_model) both use it, and it
imports neither. Sharing a reader cannot hide a conversion bug (a reader returns a file's bytes as
stored; the layout transforms that could be wrong live on each side, written twice on purpose, see
docs/facts.md), while three readers with three size caps and dtype tables could disagree on which
files are readable.

Every reader refuses a damaged file with `FormatError`: one line naming the file, an OSError, so the
CLI reports it as bad input (exit 2) and `verify` tells it apart from a parity failure.
"""

from .errors import FormatError

__all__ = ["FormatError"]
