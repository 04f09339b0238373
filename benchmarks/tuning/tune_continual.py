"""Bottle as task 0 (8 epochs), transistor as task 1 (expert only): image/pixel AUROC of both.

    python benchmarks/tuning/tune_continual.py 16 '{}'     # task-1 epochs, config overrides
"""
import torch, sys, math, json, os
from anomalib_moleflow.continual.evaluation import _metrics
from anomalib_moleflow import MoLEFlowConfig, MoLEFlowModel
from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss
CACHE = os.environ.get("MOLEFLOW_TUNE_CACHE", "results/tuning")
torch.manual_seed(0); torch.set_num_threads(1)
ep1 = int(sys.argv[1]); kw = eval(sys.argv[2]) if len(sys.argv) > 2 else {}
cfg = MoLEFlowConfig(pre_trained=False, **kw)
m = MoLEFlowModel(cfg); pos = m.feature_extractor.position_embedding
loss_fn = MoLEFlowLoss(cfg.tail_weight, cfg.tail_top_ratio, cfg.logdet_reg)
def train(key, tr, epochs):
    params = m.prepare_task_training(key)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(tr) / 16))
    for ep in range(epochs):
        perm = torch.randperm(len(tr)); m.train()
        for i in range(0, len(tr), 16):
            z, ld = m.flow_forward(tr[perm[i:i+16]]); loss, _ = loss_fn(z, ld); loss = loss + m.regularization()
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip); opt.step(); sched.step()
def evaluate(key, d):
    m.eval(); te = d["test"] + pos; s, a = [], []
    with torch.no_grad():
        for i in range(0, len(te), 16):
            b = m.score_features(te[i:i+16], key); s.append(b.pred_score); a.append(b.anomaly_map)
    s = torch.cat(s); a = torch.cat(a)[:, 0]
    if os.environ.get("MOLEFLOW_TUNE_DUMP"):  # raw patch scores, for post-hoc scoring experiments
        with torch.no_grad():
            dump = dict(labels=d["labels"], masks=d["masks"])
            for split in ("train", "test"):
                x = d[split] + pos
                dump[f"{split}_patch_scores"] = torch.cat([m.patch_scores(x[i:i+16], key) for i in range(0, len(x), 16)])
        torch.save(dump, f"{os.environ['MOLEFLOW_TUNE_DUMP']}_{key}.pt")
    res = _metrics(s, a, d["labels"], d["masks"].bool())  # the continual evaluation's exact metrics
    return round(res["image_AUROC"], 4), round(res["pixel_AUROC"], 4)
def load(cat):
    d = torch.load(os.path.join(CACHE, f"feats_{cat}_{cfg.backbone}_{cfg.image_size}{'' if cfg.feature_aggregation_kernel == 3 else f'_agg{cfg.feature_aggregation_kernel}'}.pt"))
    if cfg.grid_downsample > 1:  # cached features are on the backbone grid: pool them as the extractor would
        for k in ("train", "test"):
            d[k] = torch.nn.functional.avg_pool2d(d[k].permute(0, 3, 1, 2), cfg.grid_downsample, ceil_mode=True).permute(0, 2, 3, 1).contiguous()
    return d
b = load("bottle"); t = load("transistor")
m.add_task(); train("0", b["train"] + pos, int(os.environ.get("TUNE_EP0", "8")))
m.add_task(); train("1", t["train"] + pos, ep1)
print(json.dumps(dict(ep1=ep1, kw=kw, bottle=evaluate("0", b), transistor=evaluate("1", t))))
