"""TTT stability across seeds: each seed's TTT gain, and a flag on a seed whose score is an outlier, naming the
likely knob.

PR #1886's finding is the case this is for: with warm-start A and TTT weight decay 1.0, seeds 314 and 1337 fell
into a TTT attractor at ~1.121 BPB (+0.05) while seed 42 scored 1.069, and all three scored alike without TTT.
Two of three seeds collapsed, so a median would call the good seed the odd one: a seed is compared with the
*best* seed instead, and only the part of its gap that its no-TTT score does not already show is put on TTT.

    excess_ttt = (bpb - best bpb) - (no-TTT bpb - the best seed's no-TTT bpb)

A seed whose excess_ttt passes ``outlier_bpb`` is flagged with the TTT knob of its method; one whose no-TTT
score is itself that far behind is flagged as a training outlier (the seed's training, not its TTT).
"""

from __future__ import annotations

from typing import Mapping, Sequence

OUTLIER_BPB = 0.01  # seeds of one config spread ~0.0005 BPB (PR #1886: 1.0692-1.0701); its collapse was +0.05


def ttt_knob(ttt: Mapping) -> str:
    """The knob most likely behind a TTT collapse, for this TTT config (an eval artifact's config['ttt'])."""
    method = ttt.get("method", "none")
    if method in ("lora", "phased") and ttt.get("lora_warm_a"):
        return (f"eval.ttt.lora_wd (now {ttt.get('lora_wd')}): warm-start A drifts across document batches; "
                f"PR #1886 raised it 1.0 -> 2.0 (or eval.ttt.lora_warm_a=false)")
    if method in ("lora", "phased"):
        return f"eval.ttt.lora_lr (now {ttt.get('lora_lr')})" + \
            (f" or eval.ttt.phase_lr (now {ttt.get('phase_lr')})" if method == "phased" else "")
    if method == "sgd":
        return f"eval.ttt.lr (now {ttt.get('lr')}) or eval.ttt.epochs (now {ttt.get('epochs')})"
    return "training (no TTT in this eval)"


def flag_outliers(rows: Sequence[dict], ttt_configs: Sequence[Mapping], outlier_bpb: float = OUTLIER_BPB) -> list[dict]:
    """Each row with 'outlier' added: None, or what is off and the likely knob. Rows need val_bpb and, for the
    TTT part, no_ttt_val_bpb (eval's no-TTT diagnostic; without it the whole gap counts as the TTT's)."""
    if len(rows) < 2:
        return [{**r, "outlier": None} for r in rows]
    best = min(range(len(rows)), key=lambda i: rows[i]["val_bpb"])
    out = []
    for r, ttt in zip(rows, ttt_configs):
        gap = r["val_bpb"] - rows[best]["val_bpb"]
        base, ref = r.get("no_ttt_val_bpb"), rows[best].get("no_ttt_val_bpb")
        train_gap = base - ref if base is not None and ref is not None else 0.0
        flag = None
        if ttt.get("method", "none") != "none" and gap - train_gap > outlier_bpb:
            flag = f"TTT outlier: +{gap - train_gap:.4f} BPB after TTT beyond the best seed; likely knob: {ttt_knob(ttt)}"
        elif train_gap > outlier_bpb or (ttt.get("method", "none") == "none" and gap > outlier_bpb):
            flag = (f"training outlier: +{max(train_gap, gap):.4f} BPB before TTT; likely knob: the training schedule "
                    f"(train.matrix_lr, train.grad_clip)")
        out.append({**r, "outlier": flag})
    return out
