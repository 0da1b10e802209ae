"""prosparse-bench --serve: aggregate decode tokens/s of prosparse-server beside llama.cpp's own
llama-server at N concurrent streams, through the same HTTP client.

For each model, each concurrency N and each server configuration, a fresh server is started with N
slots (`-np N`, `-c` N x the per-slot context for llama-server, whose -c is the total; -c per slot
for ours), warmed up with one short request, then sent N concurrent streamed greedy completions
(`temperature` 0, `ignore_eos`, `max_tokens` = -n), `reps` times. Every server gets the same
prompts: token ids (a fixed pseudo-random sequence per stream, no special tokens), so that both
runtimes run the same tokens whatever their tokenizers do with text. A repetition's aggregate is
the completion tokens of all N streams (each server's own `usage`) over the wall time from the first
request sent to the last stream's end; every stream must report -n tokens.

llama-server runs with the same threads (-t and -tb), continuous batching (its default), and every
combination of flash attention and weight repacking (`--peer-flash-attn`, `--peer-extra-bufts`)
under each OpenMP wait policy (`--peer-omp-wait`), for each llama-server binary found; ours is
compared with the best of them at each N. Ours runs each FFN strategy asked for (default: predict
on the 7B FATReLU shape, auto elsewhere) and its union sparsity at N comes from its /stats.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import report, synth

ENV_LLAMA_SERVER = "PROSPARSE_LLAMA_SERVER"
PROMPT_TOKENS = 16
START_TIMEOUT_S = 600


# --------------------------------------------------------------------------- llama-server binaries
def find_llama_servers(spec: str, cache: Optional[Path] = None, env: Optional[dict] = None) -> List[Tuple[str, str]]:
    """[(build name, llama-server path)]. spec: 'none'; 'auto' ($PROSPARSE_LLAMA_SERVER, a
    comma-separated list of NAME=PATH or PATH, then every ~/.cache/prosparse-bench/llama-server-NAME/
    that bench/setup_peer.sh finished building); or such a list itself. A path that is not an
    executable file raises ValueError naming it."""
    env = os.environ if env is None else env
    if spec == "none":
        return []
    items: List[Tuple[str, str]] = []
    listed = env.get(ENV_LLAMA_SERVER, "") if spec == "auto" else spec
    for item in filter(None, (x.strip() for x in listed.split(","))):
        name, _, path = item.rpartition("=")
        p = Path(path).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            src = ENV_LLAMA_SERVER if spec == "auto" else "--llama-server"
            raise ValueError(f"{src}: {path!r} is not an executable llama-server")
        items.append((name or _build_name(p), str(p)))
    if spec == "auto":
        root = cache if cache is not None else synth.cache_dir()
        for d in sorted(root.glob("llama-server-*")):
            exe = d / "bin" / "llama-server"
            if (d / ".prosparse-bench-ok").exists() and exe.is_file() and str(exe) not in {p for _, p in items}:
                items.append((d.name[len("llama-server-"):], str(exe)))
    names = [n for n, _ in items]
    return [(n if names.count(n) == 1 else f"{n}{i}", p) for i, (n, p) in enumerate(items)]


def _build_name(path: Path) -> str:
    """A label for a llama-server given by path: its setup_peer.sh folder's name, else 'llama-server'."""
    for parent in path.parents:
        if parent.name.startswith("llama-server-"):
            return parent.name[len("llama-server-"):]
    return "llama-server"


# --------------------------------------------------------------------------- configurations
@dataclass
class ServerConfig:
    """One server to measure at each concurrency: ours with an FFN strategy, or a llama-server
    binary with its settings."""
    runtime: str                      # "ours" or "llama-server"
    label: str
    exe: str = ""                     # llama-server's path
    sparsity: Optional[str] = None    # ours
    flash_attn: bool = False          # llama-server
    repack: bool = False
    omp_wait: Optional[str] = None

    def command(self, model: Path, port: int, n: int, ctx: int, threads: int, cache_type: str) -> List[str]:
        if self.runtime == "ours":
            return [sys.executable, "-m", "prosparse_rt.server", "-m", str(model), "--host", "127.0.0.1",
                    "--port", str(port), "-np", str(n), "-c", str(ctx), "-t", str(threads),
                    "--sparsity", self.sparsity or "auto", "--cache-type", cache_type, "--device", "cpu"]
        return [self.exe, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(n),
                "-c", str(n * ctx), "-t", str(threads), "-tb", str(threads), "-fa", "on" if self.flash_attn else "off",
                "--repack" if self.repack else "--no-repack", "-ctk", cache_type, "-ctv", cache_type,
                "-ngl", "0", "--no-webui", "--cont-batching"]

    def env(self) -> dict:
        env = dict(os.environ)
        if self.runtime == "llama-server" and self.omp_wait:
            if self.omp_wait == "default":
                env.pop("OMP_WAIT_POLICY", None)
            else:
                env["OMP_WAIT_POLICY"] = self.omp_wait.upper()
        return env


def peer_server_configs(servers, flash_attn: List[bool], repack: List[bool], waits: List[str]) -> List[ServerConfig]:
    def label(build, rp, w, fa):
        parts = [build if build != "llama-server" else "", "repack" if rp else "", "fa" if fa else "",
                 f"omp-{w}" if len(waits) > 1 else ""]
        parts = [p for p in parts if p]
        return "llama-server" + (f" ({' '.join(parts)})" if parts else "")

    return [ServerConfig("llama-server", label(build, rp, w, fa), exe=exe, flash_attn=fa, repack=rp, omp_wait=w)
            for build, exe in servers for rp in repack for w in waits for fa in flash_attn]


def our_server_configs(spec: str, sparsity: Optional[str]) -> List[ServerConfig]:
    strategies = sparsity or ("predict" if spec.startswith("7b-fatrelu") else "auto")
    return [ServerConfig("ours", f"prosparse-server {s}", sparsity=s) for s in strategies.split(",")]


# --------------------------------------------------------------------------- the client
def prompts(n_vocab: int, count: int, length: int = PROMPT_TOKENS) -> List[List[int]]:
    """`count` prompts of `length` token ids, the same for every server and run: pseudo-random ids
    from the middle of the vocabulary (special tokens sit at its ends in the files we bench)."""
    lo, hi = n_vocab // 8, n_vocab - n_vocab // 8
    return [random.Random(1000 + i).sample(range(lo, hi), length) for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: Optional[dict] = None, timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def get_json(port: int, path: str, timeout: float = 30.0):
    conn, r = _request(port, "GET", path, timeout=timeout)
    try:
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def stream_completion(port: int, prompt: List[int], max_tokens: int, timeout: float = 3600.0) -> dict:
    """One streamed greedy completion through /v1/completions: its text, its completion tokens (from
    the final chunk's usage), and when it ended (perf_counter)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    conn, r = _request(port, "POST", "/v1/completions", body, timeout)
    try:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        pieces, usage, first = [], None, None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    first = first or time.perf_counter()
                    pieces.append(c["text"])
        if usage is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return {"text": "".join(pieces), "tokens": int(usage["completion_tokens"]), "first": first,
                "end": time.perf_counter()}
    finally:
        conn.close()


def run_streams(port: int, prompt_ids: List[List[int]], max_tokens: int) -> dict:
    """len(prompt_ids) concurrent streams, released together: aggregate tokens/s over the wall time
    from the first request sent to the last stream's end."""
    n = len(prompt_ids)
    outs: List[dict] = [{} for _ in range(n)]
    go = threading.Barrier(n + 1)

    def one(i):
        go.wait()
        try:
            outs[i] = stream_completion(port, prompt_ids[i], max_tokens)
        except Exception as e:  # noqa: BLE001 - reported with the run
            outs[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(errors[0])
    wall = max(o["end"] for o in outs) - t0
    tokens = [o["tokens"] for o in outs]
    if any(t != max_tokens for t in tokens):
        raise RuntimeError(f"streams generated {tokens} tokens, not {max_tokens} each")
    ttft = [o["first"] - t0 for o in outs if o["first"] is not None]
    return {"wall_s": wall, "tokens": sum(tokens), "tok_s": sum(tokens) / wall,
            "ttft_s": max(ttft) if ttft else None, "texts": [o["text"] for o in outs]}


# --------------------------------------------------------------------------- one server
def _signal_name(num: int) -> str:
    import signal
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class Server:
    """A server process on a free port, its output in `log`; a context manager that stops it."""

    def __init__(self, cmd: List[str], env: dict, log: Path, timeout: float = START_TIMEOUT_S, port: int = 0):
        self.cmd, self.env, self.log, self.timeout, self.port = cmd, env, log, timeout, port
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log, "w")
        self._logf.write(" ".join(self.cmd) + "\n")
        self._logf.flush()
        env = dict(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env)
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                how = f"was killed by {_signal_name(-rc)}" if rc < 0 else f"exited with {rc}"
                raise RuntimeError(f"the server {how} while starting (log: {self.log}): " + self._tail())
            try:
                status, _ = get_json(self.port, "/health", timeout=5)
                if status == 200:
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not answer /health within {self.timeout:.0f} s")

    def _tail(self) -> str:
        self._logf.flush()
        lines = self.log.read_text(errors="replace").strip().splitlines()[1:]
        return " / ".join(lines[-3:]) or "no output"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._logf.closed:
            self._logf.close()


def measure(cfg: ServerConfig, model: Path, n: int, prompt_ids: List[List[int]], args, log: Path) -> dict:
    """cfg's server with n slots: a warm-up, then `reps` runs of n concurrent streams; for ours also
    the union sparsity at n from /stats."""
    port = free_port()
    cmd = cfg.command(model, port, n, args.serve_ctx, args.threads, args.cache_type)
    out: Dict[str, object] = {"streams": n, "config": cfg.label, "runtime": cfg.runtime}
    t_start = time.perf_counter()
    try:
        with Server(cmd, cfg.env(), log, timeout=args.timeout, port=port) as srv:
            out["start_s"] = time.perf_counter() - t_start
            run_streams(port, [prompt_ids[0]], min(4, args.tg))  # warm-up: pages, threads, allocations
            runs = [run_streams(port, prompt_ids[:n], args.tg) for _ in range(args.reps)]
            if cfg.runtime == "ours":
                _, st = get_json(port, "/stats")
                u = {int(k): v for k, v in st.get("union_fraction_by_batch", {}).items()}
                out["strategy"] = st.get("strategy")
                out["union_sparsity"] = None if n not in u else 1.0 - u[n]
                af = st.get("active_fraction")
                out["token_sparsity"] = None if af is None else 1.0 - af
                b = {int(k): v for k, v in st.get("weight_bytes_per_step_by_batch", {}).items()}
                out["weight_bytes_per_step"] = b.get(n)  # the runtime's count for steps of n tokens
            else:  # llama.cpp reads every weight once per step, whatever its token count
                out["weight_bytes_per_step"] = report.weight_bytes_per_token(model)["bytes_per_token"]
            if not srv.alive():
                raise RuntimeError("the server died during the run")
    except (RuntimeError, OSError) as e:
        out["error"] = str(e)
        return out
    rates = [r["tok_s"] for r in runs]
    mean, sd, _ = report.summarize([r["wall_s"] for r in runs], [r["tokens"] for r in runs])
    bps = out.get("weight_bytes_per_step")
    out["gbps"] = None if bps is None else bps * mean / n / 1e9  # steps/s = tok/s / n
    out.update(tok_s=mean, sd=sd, rates=rates, tokens=runs[0]["tokens"], wall_s=[r["wall_s"] for r in runs],
               ttft_s=[r["ttft_s"] for r in runs], texts=runs[0]["texts"],
               texts_stable=all(r["texts"] == runs[0]["texts"] for r in runs))
    return out


# --------------------------------------------------------------------------- the run
def estimate_seconds(models: List[Tuple[str, Path, Path]], counts: List[int], n_configs: Dict[str, Tuple[int, int]],
                     args) -> float:
    """A rough duration on a quiet host, every configuration run at every count (configurations
    dropped after the first count shorten it): per server start 2 s plus the file read at 2 GB/s, and
    per step of n streams the weights read once at 80% of DRAM_GBPS plus 20% of that per extra
    stream (batched decode turns compute-bound). A guide for choosing -n, -r, --rounds and the
    peer settings, not a measurement."""
    total = 0.0
    for spec, path, _ in models:
        file_gb = path.stat().st_size / 1e9
        step1 = report.weight_bytes_per_token(path)["bytes_per_token"] / (0.8 * report.DRAM_GBPS * 1e9)
        for n in counts:
            steps = (args.tg + PROMPT_TOKENS / 8) * args.reps + 4
            per_run = 2.0 + file_gb / 2 + steps * step1 * (1 + 0.2 * (n - 1))
            n_ours, n_peer = n_configs[spec]
            if n != counts[0] and args.peer_keep > 0:
                n_peer = min(n_peer, args.peer_keep)
            total += per_run * (n_ours + n_peer) * args.rounds
    return total


def _n_vocab(path: Path) -> int:
    import gguf
    r = gguf.GGUFReader(str(path))
    f = r.fields["tokenizer.ggml.tokens"]
    return len(f.data)


def bench_serving(args, resolve_model, cpu_name: str) -> dict:
    """Every model of args at every concurrency, ours and llama-server; the results dict."""
    counts = args.serve_counts
    servers = find_llama_servers(args.llama_server)
    if not servers and args.llama_server != "none":
        print("prosparse-bench: no llama-server found (bench/setup_peer.sh server, or "
              f"${ENV_LLAMA_SERVER}=PATH); measuring prosparse-server alone", file=sys.stderr)
    on_off = {"off": [False], "on": [True], "both": [False, True]}
    peers = peer_server_configs(servers, on_off[args.peer_flash_attn], on_off[args.peer_extra_bufts], args.omp_waits)
    targets, configs = [], {}
    for spec in args.model or ["smollm2", "7b-fatrelu"]:
        try:
            name, path, peer_path = resolve_model(spec, args)
        except (FileNotFoundError, SystemExit) as e:
            print(f"prosparse-bench: skipping {spec}: {e}", file=sys.stderr)
            continue
        ours = [] if args.no_ours else our_server_configs(spec, args.sparsity)
        targets.append((spec, name, path, peer_path))
        configs[spec] = ours + peers
    est = estimate_seconds([(s, p, q) for s, _, p, q in targets], counts,
                           {s: (len(c) - len(peers), len(peers)) for s, c in configs.items()}, args)
    n_ours = {s: len(c) - len(peers) for s, c in configs.items()}
    later = len(peers) if not args.peer_keep else min(len(peers), args.peer_keep)
    n_runs = sum(args.rounds * (len(c) + (len(counts) - 1) * (n_ours[s] + later)) for s, c in configs.items())
    print(f"prosparse-bench --serve: at most {n_runs} server runs "
          f"({', '.join(f'{s}: {len(c)} configurations' for s, c in configs.items())} x {len(counts)} concurrencies"
          f" x {args.rounds} rounds" + (f"; past {counts[0]} streams at most {args.peer_keep} llama-server "
                                          "configurations" if args.peer_keep else "")
          + f"), {args.tg} tokens per stream, {args.reps} repetitions each; "
          f"estimated {est / 60:.0f} min on a quiet host", file=sys.stderr, flush=True)
    if args.estimate:
        return {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = Path(args.results) / f"serve-{stamp}-logs"
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "serve", "cpu": cpu_name,
               "threads": args.threads, "tokens_per_stream": args.tg, "prompt_tokens": PROMPT_TOKENS,
               "reps": args.reps, "rounds": args.rounds, "ctx_per_slot": args.serve_ctx, "streams": counts,
               "estimated_s": est, "models": []}
    t0 = time.perf_counter()
    for spec, name, path, peer_path in targets:
        prompt_ids = prompts(min(_n_vocab(path), _n_vocab(peer_path)), max(counts))
        cells: Dict[Tuple[str, int], dict] = {}
        dropped: Dict[str, str] = {}
        for rnd in range(args.rounds):
            for n in counts:
                if rnd == 0 and n != counts[0]:
                    dropped.update(_drop_peers(configs[spec], cells, counts[0], args.peer_keep, dropped))
                for cfg in configs[spec]:
                    if cfg.label in dropped:
                        continue
                    model = path if cfg.runtime == "ours" else peer_path
                    log = logs / f"{spec}-{cfg.label.replace(' ', '_').replace('(', '').replace(')', '')}-np{n}-r{rnd}.log"
                    print(f"prosparse-bench: {name}: {cfg.label}, {n} streams"
                          + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "") + " ...",
                          file=sys.stderr, flush=True)
                    r = measure(cfg, model, n, prompt_ids, args, log)
                    cells[(cfg.label, n)] = _pool(cells.get((cfg.label, n)), r)
                    print("  " + (f"failed: {r['error']}" if "error" in r else f"{r['tok_s']:.2f} tok/s aggregate")
                          + f" [{time.perf_counter() - t0:.0f} s so far]", file=sys.stderr, flush=True)
        results["models"].append({"spec": spec, "name": name, "path": str(path), "peer_path": str(peer_path),
                                  "runs": list(cells.values()), "dropped": dropped})
    results["elapsed_s"] = time.perf_counter() - t0
    summarize(results)
    return results


def _drop_peers(cfgs: List[ServerConfig], cells: Dict[Tuple[str, int], dict], first: int, keep: int,
                dropped: Dict[str, str]) -> Dict[str, str]:
    """The llama-server configurations not to run past the first concurrency: those that could not
    start there (a build whose repacked weights use instructions this CPU refuses, say), and with
    keep > 0 all but the `keep` fastest there. {label: why}."""
    out: Dict[str, str] = {}
    timed = []
    for cfg in cfgs:
        r = cells.get((cfg.label, first))
        if cfg.runtime != "llama-server" or r is None or cfg.label in dropped:
            continue
        if "error" in r and "while starting" in r["error"]:
            out[cfg.label] = f"did not start at {first} streams"
        elif "error" not in r:
            timed.append((r["tok_s"], cfg.label))
    if keep > 0:
        for _, label in sorted(timed, reverse=True)[keep:]:
            out[label] = f"not among the {keep} fastest llama-server configurations at {first} streams (--peer-keep)"
    return out


def _pool(a: Optional[dict], b: dict) -> dict:
    """One configuration at one concurrency over rounds: every repetition's rate (a failed round
    fails it)."""
    if a is None or "error" in a:
        return b if a is None else a
    if "error" in b:
        return b
    a["rates"] = a["rates"] + b["rates"]
    a["wall_s"] = a["wall_s"] + b["wall_s"]
    a["ttft_s"] = a["ttft_s"] + b["ttft_s"]
    a["texts_stable"] = a["texts_stable"] and b["texts_stable"] and a["texts"] == b["texts"]
    toks = [a["tokens"]] * len(a["wall_s"])
    a["tok_s"], a["sd"], _ = report.summarize(a["wall_s"], toks)
    return a


def summarize(results: dict) -> None:
    """Per model and concurrency: ours beside the best llama-server, the ratios the aims name, and
    whether each of our prompts got the same text at every concurrency (batch invariance)."""
    for m in results["models"]:
        ok = [r for r in m["runs"] if "error" not in r]
        rows = []
        ours_labels = list(dict.fromkeys(r["config"] for r in ok if r["runtime"] == "ours"))
        for n in results["streams"]:
            peer = max((r for r in ok if r["runtime"] == "llama-server" and r["streams"] == n),
                       key=lambda r: r["tok_s"], default=None)
            for label in ours_labels or [None]:
                mine = next((r for r in ok if r["config"] == label and r["streams"] == n), None)
                one = next((r for r in ok if r["config"] == label and r["streams"] == results["streams"][0]), None)
                peer_one = max((r for r in ok if r["runtime"] == "llama-server" and r["streams"] == results["streams"][0]),
                               key=lambda r: r["tok_s"], default=None)
                rows.append({
                    "streams": n, "ours": label,
                    "ours_tok_s": mine and mine["tok_s"], "ours_sd": mine and mine["sd"],
                    "vs_ours_1": (mine["tok_s"] / one["tok_s"]) if mine and one else None,
                    "union_sparsity": mine and mine.get("union_sparsity"),
                    "ours_gbps": mine and mine.get("gbps"), "peer_gbps": peer and peer.get("gbps"),
                    "peer": peer and peer["config"], "peer_tok_s": peer and peer["tok_s"], "peer_sd": peer and peer["sd"],
                    "peer_vs_1": (peer["tok_s"] / peer_one["tok_s"]) if peer and peer_one else None,
                    "vs_peer": (mine["tok_s"] / peer["tok_s"]) if mine and peer else None})
        m["table"] = rows
        # batch invariance: each prompt's greedy text the same at every concurrency, per strategy
        inv = {}
        for label in ours_labels:
            texts: Dict[int, str] = {}
            same = True
            for r in ok:
                if r["config"] == label:
                    for i, t in enumerate(r["texts"]):
                        same &= texts.setdefault(i, t) == t
            inv[label] = same
        m["texts_same_at_every_concurrency"] = inv
        m["aims"] = _aims(m["spec"], rows)


AIM_4X = {"smollm2": 1.6, "7b-fatrelu": 2.5}


def _aims(spec: str, rows: List[dict]) -> dict:
    """The issue's aims: four streams at least AIM_4X times one stream, and ahead of llama-server
    at every concurrency measured (None where a figure is missing)."""
    aim = next((v for k, v in AIM_4X.items() if spec == k or spec.startswith(k + "-")), None)
    from_one = bool(rows) and rows[0]["streams"] == 1  # the ratios are to the first concurrency's
    four = next((r["vs_ours_1"] for r in rows if r["streams"] == 4 and r["vs_ours_1"] is not None and from_one), None)
    ahead = [r["vs_peer"] for r in rows if r["vs_peer"] is not None]
    if any(v <= 1.0 for v in ahead):
        everywhere = False
    else:  # ahead wherever both were measured: yes only if both were measured everywhere
        everywhere = True if ahead and len(ahead) == len(rows) else None
    return {"four_vs_one": four, "four_vs_one_aim": aim,
            "four_vs_one_met": None if aim is None or four is None else four >= aim,
            "ahead_of_llama_server_everywhere": everywhere}


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    out = [f"prosparse-server beside llama-server, {results['threads']} threads, {results['cpu']}; "
           f"{results['tokens_per_stream']} greedy tokens per stream (ignore_eos) after {results['prompt_tokens']}-token "
           f"prompts, {results['reps']} repetitions x {results['rounds']} rounds; aggregate = all streams' "
           "completion tokens / wall time; GB/s = weight bytes one decode step reads (ours: the runtime's count "
           "for steps of N tokens, the FFN union once; llama-server: every weight) x steps/s (tok/s / N)"]
    for m in results["models"]:
        out += ["", f"**{m['name']}** (ours: {Path(m['path']).name}; llama-server: {Path(m['peer_path']).name})", "",
                f"| streams | ours | ours tok/s | ours GB/s | vs ours at {results['streams'][0]} | FFN union sparsity "
                f"| best llama-server | its tok/s | its GB/s | its vs {results['streams'][0]} | ours / llama-server |",
                "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in m["table"]:
            us = "-" if r["union_sparsity"] is None else f"{100 * r['union_sparsity']:.1f}%"
            ours_t = "-" if r["ours_tok_s"] is None else f"{r['ours_tok_s']:.2f} ± {r['ours_sd']:.2f}"
            peer_t = "-" if r["peer_tok_s"] is None else f"{r['peer_tok_s']:.2f} ± {r['peer_sd']:.2f}"
            out.append(f"| {r['streams']} | {r['ours'] or '-'} | {ours_t} | {_f(r.get('ours_gbps'))} "
                       f"| {_f(r['vs_ours_1'], '{:.2f}x')} | {us} | {r['peer'] or '-'} | {peer_t} | {_f(r.get('peer_gbps'))} "
                       f"| {_f(r['peer_vs_1'], '{:.2f}x')} | {_f(r['vs_peer'], '{:.2f}x')} |")
        a = m["aims"]
        lines = []
        if a["four_vs_one_aim"] is not None and results["streams"][0] == 1:
            lines.append(f"4 streams vs 1: {_f(a['four_vs_one'], '{:.2f}x')} (aim >= {a['four_vs_one_aim']}x: "
                         f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[a['four_vs_one_met']] })")
        lines.append("ahead of llama-server at every concurrency: "
                     + {True: "yes", False: "NO", None: "not measured"}[a["ahead_of_llama_server_everywhere"]])
        inv = m["texts_same_at_every_concurrency"]
        if inv:
            lines.append("our texts the same at every concurrency: "
                         + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in inv.items()))
        out += ["", "; ".join(lines) + "."]
        for r in m["runs"]:
            if "error" in r:
                out.append(f"- {r['config']} at {r['streams']} streams failed: {r['error'][:200]}")
        for label, why in m.get("dropped", {}).items():
            out.append(f"- {label}: not run at more streams: {why}")
    return "\n".join(out)


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.5 * max(len(models), 1), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        labels = list(dict.fromkeys(r["config"] for r in m["runs"] if "error" not in r))
        for label in labels:
            pts = sorted((r["streams"], r["tok_s"]) for r in m["runs"] if r["config"] == label and "error" not in r)
            ours = label.startswith("prosparse")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if ours else ".", lw=2 if ours else 0.8,
                    color=None if ours else "tab:gray", alpha=1.0 if ours else 0.5, label=label if ours else None)
        best = {}
        for r in m["runs"]:
            if r["runtime"] == "llama-server" and "error" not in r:
                best[r["streams"]] = max(best.get(r["streams"], 0.0), r["tok_s"])
        if best:
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], marker="s", lw=2, color="black",
                    label="llama-server, best configuration at each N (gray: each)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["streams"], [str(n) for n in results["streams"]])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate decode tok/s")
        ax.set_title(m["name"][:60], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{results['cpu']}, {results['threads']} threads", fontsize=8)
    return report.save_figure(fig, path)


def parse_counts(value: str) -> List[int]:
    """--serve's concurrencies: ValueError naming the option unless positive integers, increasing."""
    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts) or counts != sorted(set(counts)):
        raise ValueError(f"--serve: expected increasing stream counts such as 1,2,4,8, got {value!r}")
    return counts


def lscpu_name(fallback: str) -> str:
    """lscpu's "Model name", else `fallback`."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return fallback
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip() or fallback
    return fallback


def main(args, resolve_model, cpu_name: str) -> int:
    cpu_name = lscpu_name(cpu_name)
    try:
        results = bench_serving(args, resolve_model, cpu_name)
    except ValueError as e:
        print(f"prosparse-bench: {e}", file=sys.stderr)
        return 2
    if args.estimate:
        return 0
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jpath = out / f"serve-{stamp}.json"
    jpath.write_text(json.dumps(results, indent=1))
    ppath = plot(results, out / f"serve-{stamp}.png") if results["models"] else None
    if args.output == "json":
        print(json.dumps(results, indent=1))
    else:
        print("\n" + markdown(results))
    print(f"\nwrote {jpath}" + (f" and {ppath}" if ppath else "") + f" ({results['elapsed_s']:.0f} s; "
          f"estimated {results['estimated_s']:.0f} s)", file=sys.stderr)
    return 0
