"""resbm-generate: continue a prompt with an exported model (resbm-export), printing as it goes.

    resbm-generate --model my-model --prompt "To be, or not to be" --max-tokens 40
    resbm-generate --model my-model --prompt "def main(" --temperature 0 --device cuda

Temperature 0 is greedy and deterministic; otherwise the draw is seeded (--seed), so the same
command prints the same text on any device. A KV cache makes each new token cost one position.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from protocol.exits import Exit, Misconfigured, exits_cleanly
from protocol.settings import load_settings
from resbm.generate import SamplingConfig, stream
from scripts.model_cli import ModelToolSettings, device_of, flag, open_export

__all__ = ["GenerateSettings", "main"]


class GenerateSettings(ModelToolSettings):
    """Settings of resbm-generate."""

    model: str = flag("", "the folder resbm-export wrote")
    prompt: str = flag("", "the text to continue")
    max_tokens: int = flag(64, "new tokens at most (generation also stops at the end-of-text token)")
    temperature: float = flag(0.8, "sampling temperature; 0 = greedy (always the most likely token)")
    top_k: int = flag(0, "sample only among the k most likely tokens (0 = off)")
    top_p: float = flag(1.0, "sample only among the most likely tokens holding this much probability (1 = off)")
    seed: int = flag(0, "seed of the sampling draws")
    no_cache: bool = flag(False, "recompute the whole context for every token instead of using the KV cache")


class _Printer:
    """Prints the decoded continuation as it grows, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.shown = tokenizer, [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        self._show(self.tok.decode(self.ids, skip_special_tokens=False))
        print(flush=True)

    def _show(self, text: str) -> None:
        sys.stdout.write(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)
        sys.stdout.flush()
        self.shown = text


@exits_cleanly
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Load the export, encode the prompt, print the prompt and its continuation."""
    s = load_settings(GenerateSettings, argv, prog="resbm-generate", description=__doc__.split("\n")[0])
    if not s.prompt:
        raise Misconfigured(Exit.USAGE, "--prompt is required: the text to continue")
    if s.max_tokens < 0:
        raise Misconfigured(Exit.USAGE, f"--max-tokens must be >= 0, got {s.max_tokens}")
    try:
        sampling = SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
    except ValueError as exc:
        raise Misconfigured(Exit.USAGE, f"{exc}; see resbm-generate --help") from None
    ex = open_export(s.model, device_of(s.device))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ex.tokenizer_file))
    ids = tok.encode(s.prompt).ids
    if not ids:
        raise Misconfigured(Exit.USAGE, "--prompt encodes to no tokens; give some text")
    if len(ids) > ex.config.seq_len:
        print(f"(the prompt is {len(ids)} tokens; the model sees the last {ex.config.seq_len})", file=sys.stderr)
    sys.stdout.write(s.prompt)
    out = _Printer(tok)
    for token in stream(ex.model, ids, s.max_tokens, sampling, stop_id=ex.info.get("eot_id"),
                        use_cache=not s.no_cache):
        out.add(token)
    out.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
