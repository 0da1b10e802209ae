"""Bytes read per token from a GGUF's tensor table, and the table / JSON / plot of a bench run."""
from __future__ import annotations

import functools
import statistics
from pathlib import Path

DRAM_GBPS = 30.0  # typical read bandwidth of the 2-core machine, for results without a measured one


def dram_gbps(results: dict) -> float:
    """The run's measured read bandwidth (bandwidth.py, mean of before and after), else DRAM_GBPS."""
    m = results.get("dram_gbps_measured")
    return float(m["mean"]) if m else DRAM_GBPS


def weight_bytes_per_token(path) -> dict:
    """Bytes of weights a dense decoder reads for one token: every tensor once, except the token
    embedding table, of which one row is read (the whole table when it doubles as the output
    matrix, as in tied models like SmolLM2). Predictors and neuron statistics (fc1, fc2,
    ffn_act_freq) are not read by a dense decoder and are left out."""
    import gguf
    r = gguf.GGUFReader(str(path))
    total, embd, tied = 0, 0, True
    file_bytes = 0
    for t in r.tensors:
        file_bytes += int(t.n_bytes)
        if t.name == "token_embd.weight":
            embd = int(t.n_bytes)
            n_rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # ggml order: {n_embd, n_vocab}
            row = embd // max(n_rows, 1)
        elif t.name.endswith((".fc1.weight", ".fc2.weight", ".ffn_act_freq")):
            continue
        else:
            total += int(t.n_bytes)
        if t.name == "output.weight":
            tied = False
    per_token = total + (embd + row if tied else row)
    return {"bytes_per_token": per_token, "weights_bytes": file_bytes, "tied_output": tied}


KV_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


@functools.lru_cache(maxsize=16)
def _kv_values_per_position(path: str) -> int:
    """Keys and values one position adds to the cache: 2 x layers x KV heads x head size (read once
    per file: the gguf reader parses every metadata array, the vocabulary included)."""
    import gguf
    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def key(suffix):
        f = r.fields.get(f"{arch}.{suffix}")
        return int(f.parts[-1][0]) if f else None

    n_layer, n_embd, n_head = key("block_count"), key("embedding_length"), key("attention.head_count")
    n_kv = key("attention.head_count_kv") or n_head
    return 2 * n_layer * n_kv * (n_embd // n_head)


def kv_bytes_per_token(path, positions, cache_type) -> float:
    """Bytes of KV cache one decode step reads at `positions` cached positions: keys and values
    of every layer and KV head (llama.cpp and ours store the same values in the same types)."""
    return _kv_values_per_position(str(path)) * positions * KV_BYTES_PER_VALUE[cache_type]


def summarize(seconds, n_tokens):
    """tokens/s per repetition -> mean, sd (sample sd, 0 for one repetition)."""
    rates = [n / s for n, s in zip(n_tokens, seconds) if s > 0]
    mean = statistics.fmean(rates) if rates else float("nan")
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return mean, sd, rates


def rows_of(results: dict):
    """Flatten a results dict into table rows (one per model × runtime × test)."""
    rows = []
    for m in results["models"]:
        def test_name(test, n, r):
            return f"{test}{n}" + (f" @ d{r['depth']}" if r.get("depth") else "")

        def read_per_token(r):  # weights + cache bytes a decode step reads
            return r.get("bytes_per_token", m["bytes_per_token"]) + r.get("kv_bytes_per_token", 0.0)

        best, best_bytes = {}, {}
        for r in m["runs"]:
            if r["runtime"] == "llama.cpp" and "error" not in r:
                for test, n in (("pp", m["pp"]), ("tg", m["tg"])):
                    if test in r and r[test]["mean"] > best.get(test_name(test, n, r), 0.0):
                        t = test_name(test, n, r)
                        best[t], best_bytes[t] = r[test]["mean"], read_per_token(r)
        for r in m["runs"]:
            label = r["runtime"] + (f" ({r['build']})" if r.get("build") else "")
            if r.get("strategy") and r["runtime"] != "llama.cpp":
                label += f" {r['strategy']}"
            if "error" in r:
                rows.append(dict(model=m["name"], runtime=label, test="-", error=r["error"]))
                continue
            for test, n in (("pp", m["pp"]), ("tg", m["tg"])):
                if test not in r:
                    continue
                x = r[test]
                t = test_name(test, n, r)
                row = dict(model=m["name"], size_gb=m["weights_bytes"] / 1e9, runtime=label,
                           threads=r["threads"], test=t, mean=x["mean"], sd=x["sd"],
                           ratio=(x["mean"] / best[t]) if best.get(t) else None)
                if test == "tg":
                    bpt = r.get("bytes_per_token", m["bytes_per_token"])
                    kv = r.get("kv_bytes_per_token", 0.0)
                    row["gb_per_token"] = bpt / 1e9
                    row["kv_gb_per_token"] = kv / 1e9
                    row["gbps"] = (bpt + kv) * x["mean"] / 1e9
                    if best.get(t) and r["runtime"] != "llama.cpp":
                        # the byte bound: the best llama.cpp's decode at its bytes per token, moved
                        # to ours at the same bandwidth (both are memory-bound)
                        row["byte_bound"] = best[t] * best_bytes[t] / (bpt + kv)
                rows.append(row)
    return rows


def markdown_table(results: dict) -> str:
    bw = dram_gbps(results)
    head = ("| model | size | runtime | threads | test | t/s | vs best llama.cpp "
            f"| GB read/token (weights + cache) | GB/s (of {bw:.1f}{' measured' if 'dram_gbps_measured' in results else ''}) "
            "| byte bound (ours of it) |\n"
            "|---|---:|---|---:|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows_of(results):
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['runtime']} | | | failed: {r['error'][:60]} | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        gbt = f"{r['gb_per_token']:.3f} + {r['kv_gb_per_token']:.3f}" if "gb_per_token" in r else ""
        gbps = f"{r['gbps']:.1f} ({100 * r['gbps'] / bw:.0f}%)" if "gbps" in r else ""
        bound = (f"{r['byte_bound']:.2f} ({100 * r['mean'] / r['byte_bound']:.0f}%)"
                 if r.get("byte_bound") else "")
        lines.append(f"| {r['model']} | {r['size_gb']:.2f} GB | {r['runtime']} | {r['threads']} "
                     f"| {r['test']} | {r['mean']:.2f} ± {r['sd']:.2f} | {ratio} | {gbt} | {gbps} | {bound} |")
    return "\n".join(lines)


def plot(results: dict, path) -> Path:
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows_of(results) if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    tests = list(dict.fromkeys(r["test"] for r in rows))
    fig, axes = plt.subplots(len(models), len(tests), figsize=(5.5 * len(tests), 3.2 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, t in enumerate(tests):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == m and r["test"] == t]
            if not sel:  # e.g. a decode-only model beside others with a prompt test
                ax.axis("off")
                continue
            labels = [r["runtime"] for r in sel]
            colors = ["tab:gray" if r["runtime"].startswith("llama.cpp") else "tab:blue" for r in sel]
            ax.barh(range(len(sel)), [r["mean"] for r in sel], xerr=[r["sd"] for r in sel],
                    color=colors)
            ax.set_yticks(range(len(sel)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(textwrap.fill(f"{m} {t}", 45), fontsize=8)
            ax.set_xlabel("tokens/s")
            if t.startswith("tg"):
                mm = next(x for x in results["models"] if x["name"] == m)
                bw = dram_gbps(results)
                limit = bw * 1e9 / mm["bytes_per_token"]
                ax.axvline(limit, color="tab:red", ls="--", lw=1)
                ax.text(limit, len(sel) - 0.5, f"dense limit at {bw:.1f} GB/s ",
                        color="tab:red", fontsize=7, va="bottom", ha="right")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lays out, writes (creating the folder) and closes a matplotlib figure; its path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
