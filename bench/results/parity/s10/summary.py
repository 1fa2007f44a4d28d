# The tenth sitting's figures from the logs in this folder, s8/ and logs/ (run from the repository root:
# .venv/bin/python bench/results/parity/s10/summary.py > bench/results/parity/s10/summary.txt).
import sys; sys.path.insert(0, "bench")
from pathlib import Path
import parity_compare as pc
P = Path("bench/results/parity"); D = P / "s10"
refs = {"script 42 (s8)": pc.read_reference(P/"s8/reference_record_seed42_s8_postquant.log", 786432),
        "script 42 (sitting 1)": pc.read_reference(P/"logs/reference_record_seed42.log", 786432),
        "script 1337 (s10)": pc.read_reference(D/"reference_record_seed1337_s10_postquant.log", 786432)}
golfs = {"golf 42 (s10)": pc.read_golf(D/"golf_record_seed42_s10"), "golf 1337 (s10)": pc.read_golf(D/"golf_record_seed1337_s10"),
         "golf 42 (s9, old draw)": pc.read_golf(P/"s9/golf_record_seed42_s9")}
early = pc.read_golf(D/"golf_record_seed42_s10_stop30")
steps = list(range(10, 201, 10))
def mean(xs): return sum(xs)/len(xs)
def cmp(name, a, b):
    d = [a[s]-b[s] for s in steps]
    print(f"{name}: max |diff| {max(map(abs,d)):.4f} (step {steps[max(range(len(d)), key=lambda i: abs(d[i]))]}), mean {mean(d):+.4f}")
r42 = {s: mean([refs['script 42 (s8)']['loss'][s], refs['script 42 (sitting 1)']['loss'][s]]) for s in steps}
rseeds = {s: mean([r42[s], refs['script 1337 (s10)']['loss'][s]]) for s in steps}
gseeds = {s: mean([golfs['golf 42 (s10)']['loss'][s], golfs['golf 1337 (s10)']['loss'][s]]) for s in steps}
print("train loss, steps 10-200 every 10th:")
cmp("golf 42 - script 42 (mean of its two runs)", golfs['golf 42 (s10)']['loss'], r42)
cmp("golf 1337 - script 1337", golfs['golf 1337 (s10)']['loss'], refs['script 1337 (s10)']['loss'])
cmp("golf 42 - mean of script seeds (42 as the mean of its runs, 1337)", golfs['golf 42 (s10)']['loss'], rseeds)
cmp("golf 1337 - mean of script seeds", golfs['golf 1337 (s10)']['loss'], rseeds)
cmp("mean of golf seeds - mean of script seeds", gseeds, rseeds)
cmp("golf 42 s9 (old draw) - script 42", golfs['golf 42 (s9, old draw)']['loss'], r42)
print("run-to-run spread:")
cmp("script 42 s8 - script 42 sitting 1", refs['script 42 (s8)']['loss'], refs['script 42 (sitting 1)']['loss'])
cmp("script 42 (mean) - script 1337", r42, refs['script 1337 (s10)']['loss'])
cmp("golf 42 - golf 1337", golfs['golf 42 (s10)']['loss'], golfs['golf 1337 (s10)']['loss'])
e = [early['loss'][s] - golfs['golf 42 (s10)']['loss'][s] for s in range(1, 31)]
print(f"golf 42 rerun (stopped at 30) - golf 42 s10, steps 1-30: max |diff| {max(map(abs,e)):.4f}, mean {mean(e):+.4f}")
print("steps 20-90, the old draw's steady lead:")
for n, g in [("golf 42 s10", golfs['golf 42 (s10)']['loss']), ("golf 42 s9 old draw", golfs['golf 42 (s9, old draw)']['loss'])]:
    d = [g[s]-r42[s] for s in range(20, 91, 10)]; print(f"  {n} - script 42: mean {mean(d):+.4f}, range {min(d):+.4f}..{max(d):+.4f}")
print("raw val_bpb at 200:")
for n, r in {**refs, **golfs}.items(): print(f"  {n}: {r['val_bpb']:.4f}")
vr = mean([mean([refs['script 42 (s8)']['val_bpb'], refs['script 42 (sitting 1)']['val_bpb']]), refs['script 1337 (s10)']['val_bpb']])
vg = mean([golfs['golf 42 (s10)']['val_bpb'], golfs['golf 1337 (s10)']['val_bpb']])
print(f"  mean of seeds: script {vr:.4f}, golf {vg:.4f}, golf - script {vg-vr:+.4f}")
print()
print("| step | script 42, s8 | script 42, sitting 1 | script 1337, s10 | golf 42, s10 | golf 1337, s10 | golf 42 - script 42 | golf 1337 - script 1337 |")
a,b,c = refs['script 42 (s8)']['loss'], refs['script 42 (sitting 1)']['loss'], refs['script 1337 (s10)']['loss']
g,h = golfs['golf 42 (s10)']['loss'], golfs['golf 1337 (s10)']['loss']
for s in [1,2,5,10,20,40,60,80,100,120,140,160,170,180,190,200]:
    print(f"| {s} | {a[s]:.4f} | {b[s]:.4f} | {c[s]:.4f} | {g[s]:.4f} | {h[s]:.4f} | {g[s]-(a[s]+b[s])/2:+.3f} | {h[s]-c[s]:+.3f} |")
