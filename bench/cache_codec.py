"""Benchmark the cache format: bytes/position per codec vs the order-0 entropy floor, codec error, adaptive k, and
write/read throughput on one core.

Teacher data, one of:
  --data CACHE_DIR             an existing cache made by stage 1 (fp32 gives exact references; fixed k only)
  --teacher DIR --dolly FILE   a direct transformers forward of an HF teacher over Dolly rows (float32 log-softmax,
                               exact top-K and tail); --logits-from is an alias of --teacher. Default teacher: the one
                               `rlkd convert-teacher` makes; default Dolly file: $RLKD_BENCH_DATA/dev.jsonl.
  --smoke                      the tiny random test model from tests/tiny.py over the packaged Dolly sample, a few
                               rows (ids from a 512 vocab): a check that the bench runs, in seconds

Definitions printed:
  B/pos        total shard bytes (all columns: ids, log-probs, tail, targets, input ids, masks) / scored positions.
  floor        empirical order-0 entropy of the q8 layout's symbol streams: for each column, (number of symbols) x
               (entropy in bits of that column's empirical symbol distribution) / 8, summed over columns. Columns:
               top-k ids, q8 delta bytes, fp16 top-1 bit patterns, float32 tail/target-logprob bit patterns, target
               ranks, input ids, loss-mask bits, counts. ratio = B/pos / floor. It leaves out row_id and
               source_index (bookkeeping) and the Parquet footer/page headers; it counts everything else
               the format must hold (tail, target log-prob and rank, input ids, loss mask, counts).
  byteplane    the same floor with the float columns (fp16 top-1, fp32 tail and target log-prob) counted one byte
               plane at a time: their whole bit patterns are nearly all distinct, so their order-0 entropy is about
               log2(N) bits per value, a figure that shrinks relative to 32 bits only because the sample is small
               and that no coder reaches without being given the list of values.
  KL err       mean over positions of KL(p || q) between the renormalised top-k of the exact (float32) log-probs p
               and of the decoded ones q.
  max err      max |decoded - exact| over entries within 15.8 nat of their top-1 (q8 cannot saturate there).
  write/read   positions per CPU-second (process time, so other load on the machine does not count), one thread:
               CacheWriter.write of all rows; CacheReader full pass, each batch padded by rlkd.core.targets.collate
               (batch 8, no shuffle); "decode" = iter_rows (unpadded numpy).

Byte figures are exact (no rounds, no interval); the write/read rates are single measurements, reported as info.

Run: python bench/cache_codec.py --dolly dev.jsonl [--rows 200] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, set before numpy/torch load
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import data_file, default_teacher, dolly_sample, smoke_teacher  # noqa: E402
from rlkd.cache import CacheReader, CacheWriter, TeacherRow, adaptive_counts, make_row_id  # noqa: E402
from rlkd.cache.codec import encode_q8  # noqa: E402
from rlkd.core.targets import collate  # noqa: E402

SMOKE = {"rows": 4, "max_len": 48}
"""--smoke sizes; k and the min_prob values stay as in a full run, so the JSON has the same entries."""


@dataclass
class TopK:
    """One sequence's exact teacher top-K (K = the largest k benchmarked)."""

    input_ids: np.ndarray  # (T,) int32
    loss_mask: np.ndarray  # (P,) bool
    ids: np.ndarray  # (P, K) int32
    lp: np.ndarray  # (P, K) float32, exact
    tail: np.ndarray  # (P,) float64 log mass outside the top-K
    target_lp: np.ndarray  # (P,) float32
    target_rank: np.ndarray  # (P,) int32
    source_index: int


# ---- teacher data ---------------------------------------------------------------------------------------------

def dolly_rows(path: Path, n: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def topk_from_model(model_dir: Path, dolly: Path, n_rows: int, K: int, max_len: int) -> list[TopK]:
    """Direct transformers forward (float32): exact top-K, tail by log-sum-exp of the rest, target lp and rank."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for i, ex in enumerate(dolly_rows(dolly, n_rows)):
        user = ex["instruction"] + (("\n\n" + ex["context"]) if ex.get("context") else "")
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        full = tok.apply_chat_template([{"role": "user", "content": user},
                                        {"role": "assistant", "content": ex["response"]}], tokenize=True,
                                       return_dict=False)
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
            prompt, full = prompt["input_ids"], full["input_ids"]
        ids = np.asarray(full[:max_len], dtype=np.int32)
        if len(ids) < 3:
            continue
        with torch.no_grad():
            logits = model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0, :-1].float()  # (P, V)
            lp = torch.log_softmax(logits, dim=-1)  # (P, V)
            top = torch.topk(lp, K, dim=-1)  # (P, K), sorted
            rest = lp.scatter(1, top.indices, float("-inf"))
            tail = torch.logsumexp(rest.double(), dim=-1)  # (P,) exact tail, no cancellation
            nxt = torch.as_tensor(ids[1:], dtype=torch.long)
            tlp = lp.gather(1, nxt[:, None])[:, 0]
            rank = (lp > tlp[:, None]).sum(dim=1) + 1
        P = len(ids) - 1
        out.append(TopK(ids, np.arange(P) + 1 >= len(prompt), top.indices.numpy().astype(np.int32),
                        top.values.numpy().astype(np.float32), tail.numpy(), tlp.numpy(),
                        rank.numpy().astype(np.int32), i))
        if (i + 1) % 50 == 0:
            print(f"  teacher forward: {i + 1}/{n_rows} rows", file=sys.stderr)
    return out


def topk_from_cache(cache: Path, n_rows: int) -> tuple[list[TopK], int]:
    reader = CacheReader(cache, shuffle=False)
    K = reader.k
    out = []
    for r in reader.iter_rows():
        P = r.num_positions
        if not (r.topk_count == K).all():
            raise SystemExit(f"{cache} uses adaptive k; the benchmark needs a fixed-k cache")
        out.append(TopK(r.input_ids, r.loss_mask, r.topk_ids.reshape(P, K), r.topk_logprobs.reshape(P, K),
                        r.tail_logmass.astype(np.float64), r.target_logprob, r.target_rank, r.source_index))
        if len(out) == n_rows:
            break
    print(f"  {cache}: codec {reader.codec} (the reference is what that codec stored)", file=sys.stderr)
    return out, K


def tail_at(t: TopK, counts: np.ndarray) -> np.ndarray:
    """Exact log mass outside the first ``counts[p]`` entries: tail_K plus the dropped top-K entries (float64)."""
    p = np.exp(t.lp.astype(np.float64))  # (P, K)
    dropped = np.where(np.arange(t.lp.shape[1])[None] >= counts[:, None], p, 0.0).sum(axis=1)
    return np.log(np.exp(t.tail) + dropped)


def rows_at(data: list[TopK], k: int, min_prob: float | None = None) -> list[TeacherRow]:
    rows = []
    for t in data:
        lp = t.lp[:, :k]
        counts = (adaptive_counts(lp, min_prob, 1) if min_prob else np.full(lp.shape[0], k)).astype(np.int32)
        keep = np.arange(k)[None] < counts[:, None]
        rows.append(TeacherRow(make_row_id(t.input_ids, t.source_index), t.source_index, t.input_ids, t.loss_mask,
                               counts, t.ids[:, :k][keep], lp[keep], tail_at(t, counts).astype(np.float32),
                               t.target_lp, t.target_rank))
    return rows


# ---- measurements ---------------------------------------------------------------------------------------------

def entropy_bytes(symbols: np.ndarray) -> float:
    """Order-0 entropy of a symbol stream, in bytes: N * H(empirical distribution) / 8."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(symbols.size * -(p * np.log2(p)).sum() / 8)


def floor_bytes(rows: list[TeacherRow]) -> dict:
    counts = np.concatenate([r.topk_count for r in rows])
    top1, codes = encode_q8(np.concatenate([r.topk_logprobs for r in rows]), counts)
    streams = {
        "topk_ids": np.concatenate([r.topk_ids for r in rows]),
        "q8_deltas": codes,
        "top1_fp16": top1.view(np.uint16),
        "tail_fp32": np.concatenate([r.tail_logmass for r in rows]).astype(np.float32).view(np.uint32),
        "target_logprob_fp32": np.concatenate([r.target_logprob for r in rows]).astype(np.float32).view(np.uint32),
        "target_rank": np.concatenate([r.target_rank for r in rows]),
        "input_ids": np.concatenate([r.input_ids for r in rows]),
        "loss_mask": np.concatenate([r.loss_mask for r in rows]),
        "topk_count": counts,
    }
    return {name: entropy_bytes(s) for name, s in streams.items()}


FLOOR_COLUMN = {"topk_ids": "topk_ids", "q8_deltas": "logprob_gaps", "top1_fp16": "top1_logprob",
                "tail_fp32": "tail_logmass", "target_logprob_fp32": "target_logprob", "target_rank": "target_rank",
                "input_ids": "input_ids", "loss_mask": "loss_mask", "topk_count": "topk_count"}
"""Floor stream -> the Parquet column holding it. ``row_id`` and ``source_index`` are bookkeeping the floor omits."""


def byte_plane_bytes(values: np.ndarray) -> float:
    """Order-0 entropy of a fixed-width stream taken one byte plane at a time (what BYTE_STREAM_SPLIT + an order-0
    coder sees), in bytes."""
    b = np.ascontiguousarray(values).view(np.uint8).reshape(values.shape[0], values.dtype.itemsize)
    return sum(entropy_bytes(b[:, j]) for j in range(b.shape[1]))


def floor_bytes_split(rows: list[TeacherRow]) -> dict:
    """:func:`floor_bytes`, but the float columns (fp16 top-1, fp32 tail and target log-prob) counted by byte plane.

    Why: those values are nearly all distinct, so the order-0 entropy of their whole bit patterns is about
    log2(N) bits each, however many bits they really carry: it grows with the sample and no coder can reach it
    without being handed the list of values. By byte plane (256 symbols, N >> 256) the estimate is sound.
    """
    out = floor_bytes(rows)
    counts = np.concatenate([r.topk_count for r in rows])
    top1, _ = encode_q8(np.concatenate([r.topk_logprobs for r in rows]), counts)
    out["top1_fp16"] = byte_plane_bytes(top1.view(np.uint16))
    out["tail_fp32"] = byte_plane_bytes(np.concatenate([r.tail_logmass for r in rows]).astype(np.float32))
    out["target_logprob_fp32"] = byte_plane_bytes(np.concatenate([r.target_logprob for r in rows]).astype(np.float32))
    return out


def print_column_table(cols: dict, floor: dict, floor_split: dict, P: int) -> None:
    """Where the bytes go: each Parquet column against the floor's share for it (B/position)."""
    print(f"        {'column':16} {'bytes':>7} {'floor':>7} {'byteplane':>9}")
    for stream, col in FLOOR_COLUMN.items():
        print(f"        {col:16} {cols.get(col, 0) / P:7.2f} {floor[stream] / P:7.2f} {floor_split[stream] / P:9.2f}")
    extra = {c: b for c, b in cols.items() if c not in FLOOR_COLUMN.values() and c != "_file"}
    for col, b in extra.items():
        print(f"        {col:16} {b / P:7.2f} {'-':>7} {'-':>9}")
    print(f"        {'footer+headers':16} {(cols['_file'] - sum(b for c, b in cols.items() if c != '_file')) / P:7.2f}")


def adaptive_arithmetic(rows: list[TeacherRow], floor: dict, P: int, goal: float) -> dict:
    """What an order-0 coder needs per kept entry: bits per id and per q8 delta, and the id cost a goal implies."""
    n = sum(int(r.topk_count.sum()) for r in rows)
    deltas = n - P  # one q8 byte per non-top-1 entry
    other = sum(b for s, b in floor.items() if s not in ("topk_ids", "q8_deltas")) / P
    return {"entries_per_pos": n / P, "deltas_per_pos": deltas / P, "id_bits": 8 * floor["topk_ids"] / n,
            "delta_bits": 8 * floor["q8_deltas"] / max(deltas, 1), "other_B": other,
            "floor_B": sum(floor.values()) / P, "goal_B": goal,
            "id_bits_needed": 8 * (goal - other - floor["q8_deltas"] / P) * P / n,
            "id_bits_needed_free_values": 8 * (goal - other) * P / n}


def renorm(lp: np.ndarray) -> np.ndarray:
    return lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True)


def codec_errors(exact: list[TeacherRow], decoded: list[TeacherRow]) -> dict:
    """Mean KL over the renormalised kept entries, and max abs error within 15.8 nat of the top-1."""
    kls, errs = [], []
    for a, b in zip(exact, decoded):
        counts = a.topk_count.astype(np.int64)
        starts = np.cumsum(counts) - counts
        x = a.topk_logprobs.astype(np.float64)
        y = b.topk_logprobs.astype(np.float64)
        lse_x = np.logaddexp.reduceat(x, starts)
        lse_y = np.logaddexp.reduceat(y, starts)
        px = np.exp(x - np.repeat(lse_x, counts))
        with np.errstate(invalid="ignore"):
            term = np.where(px > 0, px * ((x - np.repeat(lse_x, counts)) - (y - np.repeat(lse_y, counts))), 0.0)
        kls.append(np.add.reduceat(term, starts))
        near = np.repeat(x[starts], counts) - x < 15.8
        errs.append(np.abs(x - y)[near].max())
    return {"kl": float(np.concatenate(kls).mean()), "max_err": float(max(errs))}


def bucket_kl(data: list[TopK], exact: list[TeacherRow], decoded: list[TeacherRow]) -> float:
    """KL of the (kept entries + one tail bucket) distribution: exact top-K vs what the trainer will see."""
    kls = []
    for a, b in zip(exact, decoded):
        counts = a.topk_count.astype(np.int64)
        starts = np.cumsum(counts) - counts
        p_kept = np.exp(a.topk_logprobs.astype(np.float64))
        p_tail = np.exp(a.tail_logmass.astype(np.float64))
        q_kept = np.exp(b.topk_logprobs.astype(np.float64))
        q_tail = np.exp(b.tail_logmass.astype(np.float64))
        zq = np.add.reduceat(q_kept, starts) + q_tail
        zp = np.add.reduceat(p_kept, starts) + p_tail
        qk = q_kept / np.repeat(zq, counts)
        pk = p_kept / np.repeat(zp, counts)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_kept = np.where(pk > 0, pk * np.log(pk / qk), 0.0)
            pt, qt = p_tail / zp, q_tail / zq
            t_tail = np.where(pt > 0, pt * np.log(pt / qt), 0.0)
        kls.append(np.add.reduceat(t_kept, starts) + t_tail)
    return float(np.concatenate(kls).mean())


def column_bytes(cache: Path) -> dict:
    out: dict[str, int] = {}
    for f in cache.glob("*.parquet"):
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
        out["_file"] = out.get("_file", 0) + f.stat().st_size
    return out


def run_codec(rows: list[TeacherRow], k: int, codec: str, workdir: Path, meta: dict) -> dict:
    out = workdir / f"k{k}-{codec}-{len(list(workdir.iterdir()))}"
    positions = sum(r.num_positions for r in rows)
    t0 = time.process_time()
    with CacheWriter(out, meta, k=k, codec=codec, shard_max_bytes=1 << 40) as w:
        for r in rows:
            w.write(r)
    t_write = time.process_time() - t0
    size = sum(f.stat().st_size for f in out.glob("*.parquet"))
    t0 = time.process_time()
    decoded = list(CacheReader(out, shuffle=False).iter_rows())
    t_decode = time.process_time() - t0
    t0 = time.process_time()
    for rows in CacheReader(out, batch_size=8, shuffle=False):
        collate(rows, k)  # padded model inputs + targets, what the trainer gets
    t_read = time.process_time() - t0
    return {"codec": codec, "k": k, "positions": positions, "bytes": size, "B_per_pos": size / positions,
            "columns_B_per_pos": {c: b / positions for c, b in column_bytes(out).items()},
            "write_pos_s": positions / t_write, "decode_pos_s": positions / t_decode, "read_pos_s": positions / t_read,
            "decoded": decoded}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="an existing cache dir made by stage 1")
    src.add_argument("--teacher", "--logits-from", dest="teacher", type=Path, help="HF teacher folder")
    src.add_argument("--smoke", action="store_true",
                     help="the tiny random test model over the packaged Dolly sample, a few rows: a check, seconds")
    ap.add_argument("--dolly", type=Path, default=None, help="Dolly jsonl [$RLKD_BENCH_DATA/dev.jsonl]")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--ks", default="20,64")
    ap.add_argument("--adaptive-k", type=int, default=128)
    ap.add_argument("--min-prob", default="1e-4,1e-3", help="comma-separated; the first is the headline")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--save-cache", type=Path,
                    help="write the teacher's exact top-K (fp32 cache) here, to rerun later with --data")
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    else:  # one core for the rates; a smoke run (maybe inside the test process) leaves the thread settings alone
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        import torch

        torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    K = max(ks + [args.adaptive_k])

    with tempfile.TemporaryDirectory(prefix="rlkd-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.data:
            data, K_have = topk_from_cache(args.data, args.rows)
            source = f"cache {args.data}"
            ks = [k for k in ks if k <= K_have]
            if args.adaptive_k > K_have:
                args.adaptive_k = K_have
        else:
            if args.smoke:
                teacher = smoke_teacher(tmp)
                K = min(K, 256)
                args.dolly = args.dolly or dolly_sample()
            else:
                teacher = args.teacher or default_teacher()
                if not (teacher / "config.json").is_file():
                    ap.error(f"--teacher: no model at {teacher}; run `rlkd convert-teacher` or pass --teacher DIR")
                args.dolly = data_file(args.dolly, "dev.jsonl", ap, flag="--dolly")
            data = topk_from_model(teacher, args.dolly, args.rows, K, args.max_len)
            source = f"transformers forward of {teacher} over {len(data)} rows of {args.dolly}"
        if args.save_cache and not args.data:
            meta0 = {"teacher": {"name_or_path": str(teacher)}, "dataset": {"source": str(args.dolly),
                     "rows": args.rows, "max_len": args.max_len}, "config": {"bench": "cache_codec"}}
            with CacheWriter(args.save_cache, meta0, k=K, codec="fp32") as w:
                for r in rows_at(data, K):
                    w.write(r)
            print(f"saved the exact top-{K} to {args.save_cache} (rerun with --data {args.save_cache})")
        P = sum(len(t.input_ids) - 1 for t in data)
        print(f"data: {source}; {len(data)} rows, {P} positions ({time.perf_counter() - t0:.0f} s)\n")
        meta = {"teacher": {"name_or_path": source}, "dataset": {"source": "bench"}, "config": {}}
        results: dict = {"source": source, "rows": len(data), "positions": P, "fixed": [], "adaptive": None}

        for k in ks:
            rows = rows_at(data, k)
            floor = floor_bytes(rows)
            floor_pp = sum(floor.values()) / P
            floor_split = floor_bytes_split(rows)
            split_pp = sum(floor_split.values()) / P
            exact = run_codec(rows, k, "fp32", tmp, meta)
            print(f"k={k}: order-0 entropy floor {floor_pp:.1f} B/pos "
                  f"({', '.join(f'{n} {b / P:.1f}' for n, b in floor.items())})")
            print(f"  {'codec':5} {'B/pos':>7} {'ratio':>6} {'KL err':>9} {'max err':>8} {'write/s':>9} "
                  f"{'decode/s':>9} {'read/s':>9}")
            for codec in ("q8", "fp16", "fp32"):
                res = exact if codec == "fp32" else run_codec(rows, k, codec, tmp, meta)
                err = codec_errors(rows, res.pop("decoded"))
                res.update(err, floor_B_per_pos=floor_pp, ratio=res["B_per_pos"] / floor_pp,
                           floor_byteplane_B_per_pos=split_pp, ratio_byteplane=res["B_per_pos"] / split_pp,
                           floor_streams_B_per_pos={n: b / P for n, b in floor.items()})
                print(f"  {codec:5} {res['B_per_pos']:7.1f} {res['ratio']:6.3f} {err['kl']:9.2e} "
                      f"{err['max_err']:8.4f} {res['write_pos_s']:9.0f} {res['decode_pos_s']:9.0f} "
                      f"{res['read_pos_s']:9.0f}")
                if codec == "q8":
                    print(f"        q8 vs the floor with float columns by byte plane ({split_pp:.1f} B/pos): ratio "
                          f"{res['ratio_byteplane']:.3f}")
                    print_column_table({c: b * P for c, b in res["columns_B_per_pos"].items()}, floor, floor_split, P)
                results["fixed"].append(res)
            print()

        k = args.adaptive_k
        full = rows_at(data, k)
        results["adaptive"] = []
        for min_prob in [float(x) for x in args.min_prob.split(",")]:
            rows = rows_at(data, k, min_prob)
            kept = np.concatenate([r.topk_count for r in rows])
            moved = float(np.mean(np.concatenate([np.exp(a.tail_logmass.astype(np.float64))
                                                  - np.exp(b.tail_logmass.astype(np.float64))
                                                  for a, b in zip(rows, full)])))
            floor = floor_bytes(rows)
            floor_pp = sum(floor.values()) / P
            floor_split = floor_bytes_split(rows)
            res = run_codec(rows, k, "q8", tmp, meta)
            decoded = res.pop("decoded")
            err = codec_errors(rows, decoded)
            res.update(err, bucket_kl=bucket_kl(data, rows, decoded), mean_kept=float(kept.mean()),
                       mass_to_tail=moved, min_prob=min_prob, floor_B_per_pos=floor_pp,
                       ratio=res["B_per_pos"] / floor_pp, floor_byteplane_B_per_pos=sum(floor_split.values()) / P,
                       floor_streams_B_per_pos={n: b / P for n, b in floor.items()})
            results["adaptive"].append(res)
            print(f"adaptive k={k}, min_prob={min_prob:g} (q8): {res['B_per_pos']:.1f} B/pos (floor {floor_pp:.1f}, "
                  f"ratio {res['ratio']:.3f}), keeps {kept.mean():.1f}/{k} entries, moves {moved:.2%} of the mass "
                  "into the tail")
            print(f"  KL err over the renormalised kept entries {err['kl']:.2e}; (kept + tail bucket) KL vs exact "
                  f"{res['bucket_kl']:.2e}; max err {err['max_err']:.4f}")
            print(f"  write {res['write_pos_s']:.0f} pos/s, decode {res['decode_pos_s']:.0f} pos/s, "
                  f"read (padded batches) {res['read_pos_s']:.0f} pos/s")
            print_column_table({c: b * P for c, b in res["columns_B_per_pos"].items()}, floor, floor_split, P)
            arithmetic = adaptive_arithmetic(rows, floor, P, goal=122.0)
            res["order0_arithmetic"] = arithmetic
            a = arithmetic
            print(f"  order-0 arithmetic: {a['entries_per_pos']:.1f} ids x {a['id_bits']:.2f} bits + "
                  f"{a['deltas_per_pos']:.1f} q8 deltas x {a['delta_bits']:.2f} bits + {a['other_B']:.1f} B of "
                  f"per-position columns = {a['floor_B']:.1f} B/pos. To reach {a['goal_B']:.0f} B/pos an order-0 coder "
                  f"would need ids at <= {a['id_bits_needed']:.2f} bits each with these values (<= "
                  f"{a['id_bits_needed_free_values']:.2f} even if the values cost nothing)")
        print("goal at k=128, min_prob=1e-4: <= 122 B/pos and <= 1.2e-4 KL error (DistillKit: 244 B/pos, 0.012)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
