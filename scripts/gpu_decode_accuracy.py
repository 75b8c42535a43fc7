"""The decode step's logits against the prefill's over the same tokens, on the GPU, for a real model.

For each prompt (consecutive windows of a text), the CUDA runtime decodes NEW greedy tokens in its
captured step, keeping each step's logits; one prefill of prompt + generated tokens then gives the
logits of the same positions through the prefill path (for a weight-only package: the weights
dequantized to float16 and cuBLAS's float32 sums). Reported per package: the largest |logit
difference|, its rms, the mean KL divergence of the decode's distribution from the prefill's, and how
often the two pick the same top token (onnxopt/evaluate.py `decode_drift`). The decode GEMVs' settings
(ONNXOPT_GEMV_SUMS, read at import) apply to the whole process, so a comparison of settings is one run
per setting:

    ONNXOPT_GEMV_SUMS=word python scripts/gpu_decode_accuracy.py PKG --data TEXT --json
    ONNXOPT_GEMV_SUMS=chunk python scripts/gpu_decode_accuracy.py PKG --data TEXT --json

PKG needs every position's logits (`onnxopt optimize --target cuda --full-logits`, or a package
quantized from one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def compare(package: str, data: str, *, prompts: int, prompt_tokens: int, new_tokens: int) -> dict:
    from onnxopt.calibration.reader import check_data_file, read_tokens
    from onnxopt.evaluate import decode_drift
    from onnxopt.package import ModelPackage
    from onnxopt.runtime.tokenizer import TextTokenizer

    pkg = ModelPackage(package)
    check_data_file(data)
    tokens = read_tokens(TextTokenizer(pkg.path, eos_token_ids=[]), data, max_tokens=prompts * prompt_tokens)
    if len(tokens) < prompts * prompt_tokens:
        raise SystemExit(f"{data}: {len(tokens)} tokens, fewer than {prompts} prompts of {prompt_tokens}")
    windows = [tokens[p * prompt_tokens:(p + 1) * prompt_tokens] for p in range(prompts)]
    d = decode_drift(pkg, windows, new_tokens=new_tokens)
    return {"package": package, "mode": d.mode, "gemv_sums": os.environ.get("ONNXOPT_GEMV_SUMS", "") or None,
            "steps": d.steps, "max_abs_logit_diff": round(d.max_abs, 5), "rms_logit_diff": round(d.rms, 6),
            "mean_kl": float(f"{d.mean_kl:.3e}"), "top1_agree": round(d.top1_agree, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", nargs="+")
    ap.add_argument("--data", required=True, help="text file the prompts are cut from")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="one JSON object a package")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.prompts < 1 or args.prompt_tokens < 1:
        ap.error("--new-tokens must be at least 2, --prompts and --prompt-tokens at least 1")
    for package in args.packages:
        t0 = time.perf_counter()
        result = compare(package, args.data, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                         new_tokens=args.new_tokens)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result) if args.json else
              f"{package}: {result['steps']} decode steps ({result['mode']}), max |d logit| {result['max_abs_logit_diff']}, "
              f"rms {result['rms_logit_diff']}, mean KL {result['mean_kl']}, top-1 agree {result['top1_agree']:.2%}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
