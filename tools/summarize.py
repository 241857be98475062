"""Print the main job's comparison table from the JSON files it wrote: python tools/summarize.py OUT SCHEME..."""
import json
import sys
from pathlib import Path


def main(out: str, schemes: list[str]) -> None:
    d = Path(out)
    rows = []
    for s in schemes:
        ev = json.loads((d / f"eval-{s}.json").read_text())
        be = json.loads((d / f"bench-{s}.json").read_text())
        q = json.loads((d / f"quantize-{s}.json").read_text())
        lat = {t["shape"]: t["ratio"] for t in be["latency"]}
        secs = sum(st["seconds"] for st in q["steps"])
        rows.append((s, ev, lat, be["size"]["ratio"], secs))
    ref = rows[0][1]["perplexity_reference"]
    print(f"\nSmolLM2-135M on Hamlet (16 x 512 tokens): FP32 perplexity {ref:.2f}")
    print("| scheme | perplexity | vs FP32 | KL | top-1 | latency 1x512 | latency 1x32 | size | quantize |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, ev, lat, size, secs in rows:
        p = ev["perplexity_candidate"]
        print(f"| {s} | {p:.2f} | {p / ref:.3f}x | {ev['kl']:.4f} | {ev['top1']:.3f} | "
              f"{lat.get('1x512', float('nan')):.2f}x | {lat.get('1x32', float('nan')):.2f}x | {size:.2f}x | {secs:.0f} s |")
    print(f"\nmodels, reports and JSON in {d}/")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
