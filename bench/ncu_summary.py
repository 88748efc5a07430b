"""Summarise an ncu source page (per SASS instruction, `run_ncu` in device_lib.sh): warp stall
samples by reason, the SASS windows that hold the most samples (with the instruction kinds
that identify them: SYNCS = mbarriers, UBLKCP = the loader's bulk copies, MUFU.EX2 =
attention softmax, ...) and the top instructions.
Usage: python bench/ncu_summary.py <sass.csv[.gz]> [window=250] [top=20]"""
import collections
import csv
import gzip
import sys

KINDS = ("MUFU", "SHFL", "SYNCS", "UBLKCP", "ATOMS", "RED", "ATOM", "BAR", "LDG", "STG", "LDS",
         "HMMA", "LDSM", "CCTL", "NANOSLEEP", "MEMBAR")


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(sass: str) -> str:
    words = sass.split()
    return words[1] if words and words[0].startswith("@") else (words[0] if words else "")


def main(path: str, window: int = 250, top: int = 20) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    hdr = next(r for r in rows if r and r[0] == "Address")
    data = rows[rows.index(hdr) + 1:]
    col = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    samples = [num(r[col["Warp Stall Sampling (All Samples)"]]) for r in data]
    executed = [num(r[col["Instructions Executed"]]) for r in data]
    total = sum(samples) or 1.0
    by_reason = collections.Counter({s: sum(num(r[col[s]]) for r in data) for s in reasons})
    print(f"{len(data)} SASS instructions, {total:.0f} warp stall samples")
    for s, v in by_reason.most_common():
        if v:
            print(f"  {s:26s} {100 * v / total:5.1f}%")
    print(f"windows of {window} instructions, most samples first:")
    wins = sorted(((sum(samples[i:i + window]), i) for i in range(0, len(data), window)),
                  reverse=True)
    for v, i in wins[:top]:
        kinds = collections.Counter(opcode(r[1].strip()) for r in data[i:i + window])
        marks = " ".join(f"{k}:{n}" for k, n in kinds.items() if k.split(".")[0] in KINDS)
        print(f"  {i:6d}-{i + window:<6d} {100 * v / total:5.1f}%  max executed "
              f"{max(executed[i:i + window]):9.0f}  {marks[:150]}")
    print("instructions, most samples first:")
    for i in sorted(range(len(data)), key=lambda j: -samples[j])[:top]:
        worst = max(reasons, key=lambda s: num(data[i][col[s]]))
        print(f"  {i:6d} {100 * samples[i] / total:5.2f}%  {data[i][1].strip()[:56]:56s} "
              f"{worst}  executed {executed[i]:.0f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
