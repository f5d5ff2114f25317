"""Where a prefix goes on an encoder-decoder model (standard library only: the CLI parses it before importing torch).

- "decoder": PEFT's SEQ_2_SEQ_LM prefix, K/V in front of the decoder's self-attention (PREFIX' in Li & Liang's
  z = [PREFIX; x; PREFIX'; y]); a plain PEFT adapter.
- "encoder,decoder": the paper's full prefix, which also puts K/V in front of every encoder self-attention (PREFIX).
"""

from __future__ import annotations

DECODER_SITES = "decoder"
FULL_SITES = "encoder,decoder"
PREFIX_SITES = (DECODER_SITES, FULL_SITES)
_SITE_NAMES = frozenset({"encoder", "decoder"})


def parse_prefix_sites(text: str) -> str:
    """A comma-separated set of sites ("decoder", "encoder,decoder", "decoder, encoder", ...) -> its canonical
    spelling in PREFIX_SITES; ValueError otherwise. The decoder part is PEFT's prefix and always trained."""
    sites = {part.strip() for part in text.split(",") if part.strip()}
    if not sites or not sites <= _SITE_NAMES:
        raise ValueError(f"prefix sites must be one of {', '.join(repr(s) for s in PREFIX_SITES)}, got {text!r}")
    if "decoder" not in sites:
        raise ValueError(
            f"prefix sites {text!r}: the decoder prefix (PEFT's part) is always trained; use {FULL_SITES!r} for "
            "the full prefix"
        )
    return FULL_SITES if "encoder" in sites else DECODER_SITES
