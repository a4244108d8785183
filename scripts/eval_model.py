"""resbm-eval: loss, perplexity and bits per byte of an exported model on a dataset's held-out split.

    resbm-eval --model my-model --dataset resbm/assets/manifest.json --split validation
    resbm-eval --model my-model --dataset https://host/data/manifest.json --tokens 100000 --device cuda

The windows are the dataset's fixed validation windows (resbm.dataset.Dataset.validation_batches),
the figure the same function as the validators' live validation loss and the localnet report
computes (resbm.evaluate). By default the windows cover the split once, without overlap.
"""
from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from protocol.exits import Exit, Misconfigured, exits_cleanly
from protocol.settings import load_settings
from resbm.evaluate import SPLIT_ALIASES, evaluate_lm, held_out_batches, token_byte_lengths
from scripts.model_cli import (ModelToolSettings, check_same_tokenizer, device_of, flag, open_export,
                               open_manifest, progress_bar, quiet_logs)

__all__ = ["EvalSettings", "main"]


class EvalSettings(ModelToolSettings):
    """Settings of resbm-eval."""

    model: str = flag("", "the folder resbm-export wrote")
    dataset: str = flag("", "the dataset's manifest.json (a path, its folder, or an http(s) URL)")
    split: str = flag("validation", "the held-out split (validation, also called val)")
    tokens: int = flag(0, "target tokens to evaluate (0 = the whole split, once)")
    batch_size: int = flag(32, "windows (sequences) per forward pass")
    as_json: bool = flag(False, "print the figures as one JSON object instead of text", name="json")


@exits_cleanly
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate the export on the held-out windows and print the figures."""
    s = load_settings(EvalSettings, argv, prog="resbm-eval", description=__doc__.split("\n")[0])
    quiet_logs()
    if SPLIT_ALIASES.get(s.split) != "val":
        raise Misconfigured(Exit.USAGE, f"--split {s.split!r}: only the held-out split can be evaluated "
                            "(validation, also called val)")
    if not s.dataset:
        raise Misconfigured(Exit.USAGE, "--dataset is required: the manifest.json of the run's dataset")
    if s.batch_size < 1 or s.tokens < 0:
        raise Misconfigured(Exit.USAGE, "--batch-size must be >= 1 and --tokens >= 0")
    device = device_of(s.device)
    ex = open_export(s.model, device)
    ds = open_manifest(s.dataset)
    why = check_same_tokenizer(ds, ex.tokenizer_file, ex.config.vocab_size)
    if why:
        raise Misconfigured(Exit.CONFIG_FILE, f"{s.dataset} does not fit the model: {why}")
    T = ex.config.seq_len
    tokens = s.tokens or max(1, ds.manifest.split_tokens("val") // (T + 1)) * T
    batches = held_out_batches(ds, tokens, T, s.batch_size)
    lengths = token_byte_lengths(ds.file_path(ds.manifest.tokenizer.name), ex.config.vocab_size)
    total = sum(y.numel() for _, y in batches)
    with progress_bar(total, f"eval {ds.name}/{s.split}", "tok", disable=s.as_json) as bar:
        result = evaluate_lm(lambda t: ex.model(t), batches, lengths, device, progress=bar.update)
    out = {"model": s.model, "run_id": ex.info.get("run_id"), "round": ex.info.get("round"),
           "dataset": ds.name, "split": s.split, **result.as_dict()}
    if s.as_json:
        print(json.dumps(out))
    else:
        bpb = "n/a" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"
        print(f"{s.model} (run {out['run_id']}, after round {out['round']}) on {ds.name}/{s.split}: "
              f"{result.tokens:,} tokens, {result.bytes:,} bytes")
        print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.2f} | bits per byte {bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
