"""Prints the rows written by tools/quality/run.sh as the Markdown table of docs/quality.md, with the
issue's targets checked from the measured numbers (nothing here is tuned or hard-coded but the targets)."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
order = ["teacher-ddim50", "teacher-ddim4", "teacher-dpm4"] + [
    f"{v}-{n}" for v in ("lcm", "lcm-lora") for n in (1, 2, 4, 8)
] + ["outline-ddim50", "outline-lcm-lora-4"]
labels = {
    "teacher-ddim50": "teacher, DDIM 50 + CFG 3",
    "teacher-ddim4": "teacher, DDIM 4 + CFG 3",
    "teacher-dpm4": "teacher, DPM-Solver++ 4 + CFG 3",
    "outline-ddim50": "outline fine-tune, DDIM 50 + CFG 3",
    "outline-lcm-lora-4": "outline fine-tune + the base's LCM-LoRA, 4 steps",
}
for n in (1, 2, 4, 8):
    labels[f"lcm-{n}"] = f"full LCM, {n} step{'s' if n > 1 else ''} (w-embedding, scale 3)"
    labels[f"lcm-lora-{n}"] = f"base + LCM-LoRA, {n} step{'s' if n > 1 else ''} (guidance 1)"

print("| row | pictures | reference style | FID ↓ | adherence ↑ | background ↑ | outline share | s / picture |")
print("|---|---|---|---|---|---|---|---|")
for k in order:
    if k in rows:
        r = rows[k]
        bg = f"{r['background']:.3f}" if "background" in r else "—"
        print(f"| {labels[k]} | {r['count']} | {r['style']} | {r['fid']:.2f} | {r['adherence']:.3f} "
              f"| {bg} | {r['outline_share']:.3f} | {r['seconds_per_image']:.4f} |")


def check(name, value, limit, op="<="):
    ok = value <= limit if op == "<=" else value >= limit
    print(f"- {name}: {value:.3f} {op} {limit:.3f} → {'met' if ok else '**missed**'}")


print()
g = rows.get
if g("lcm-lora-4") and g("teacher-ddim50") and g("teacher-ddim4"):
    f = g("lcm-lora-4")["fid"]
    check("LCM-LoRA 4-step FID vs 1.3 × teacher DDIM 50", f, 1.3 * g("teacher-ddim50")["fid"])
    check("LCM-LoRA 4-step FID vs 0.5 × teacher DDIM 4", f, 0.5 * g("teacher-ddim4")["fid"])
    check("LCM-LoRA 4-step adherence vs 0.9 × teacher DDIM 50", g("lcm-lora-4")["adherence"],
          0.9 * g("teacher-ddim50")["adherence"], ">=")
if g("outline-lcm-lora-4") and g("outline-ddim50"):
    check("fine-tune + base LCM-LoRA outline share vs 0.9 × fine-tune DDIM 50",
          g("outline-lcm-lora-4")["outline_share"], 0.9 * g("outline-ddim50")["outline_share"], ">=")
    check("fine-tune + base LCM-LoRA FID (outline reference) vs 1.5 × fine-tune DDIM 50",
          g("outline-lcm-lora-4")["fid"], 1.5 * g("outline-ddim50")["fid"])
