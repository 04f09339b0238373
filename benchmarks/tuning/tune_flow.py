"""Train one MoLE-Flow expert on cached features and print image/pixel AUROC (see README.md).

    python benchmarks/tuning/tune_flow.py transistor 8 '{"lr": 2e-3}'
"""
import torch, sys, time, math, json, os
from anomalib_moleflow.continual.evaluation import _metrics
from anomalib_moleflow import MoLEFlowConfig, MoLEFlowModel
from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss
cat = sys.argv[1]; epochs = int(sys.argv[2]); kw = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
lr = kw.pop("lr", 3e-4); size = kw.get("image_size", 256); bb = kw.get("backbone", "tf_efficientnet_lite0")
torch.manual_seed(0); torch.set_num_threads(1)
d = torch.load(f"{os.environ.get('MOLEFLOW_TUNE_CACHE', 'results/tuning')}/feats_{cat}_{bb}_{size}.pt")
cfg = MoLEFlowConfig(pre_trained=False, **kw)
m = MoLEFlowModel(cfg); m.add_task(); params = m.prepare_task_training("0")
if cfg.grid_downsample > 1:  # cached features are on the backbone grid: pool them as the extractor would
    pool = lambda f: torch.nn.functional.avg_pool2d(f.permute(0, 3, 1, 2), cfg.grid_downsample, ceil_mode=True).permute(0, 2, 3, 1).contiguous()
    d["train"], d["test"] = pool(d["train"]), pool(d["test"])
pos = m.feature_extractor.position_embedding if cfg.use_position_embedding else 0
tr = d["train"] + pos; te = d["test"] + pos
loss_fn = MoLEFlowLoss(cfg.tail_weight, cfg.tail_top_ratio, cfg.logdet_reg)
opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
steps = epochs * math.ceil(len(tr) / 16); sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
t = time.time()
for ep in range(epochs):
    perm = torch.randperm(len(tr)); tot = 0
    m.train()
    for i in range(0, len(tr), 16):
        z, ld = m.flow_forward(tr[perm[i:i+16]]); loss, _ = loss_fn(z, ld); loss = loss + m.regularization()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip); opt.step(); sched.step(); tot += loss.item()
ttrain = time.time() - t
m.eval(); scores, maps = [], []
with torch.no_grad():
    for i in range(0, len(te), 16):
        b = m.score_features(te[i:i+16]); scores.append(b.pred_score); maps.append(b.anomaly_map)
    if os.environ.get("MOLEFLOW_TUNE_DUMP"):  # raw patch scores, for post-hoc scoring experiments
        patch = torch.cat([m.patch_scores(te[i:i+16]) for i in range(0, len(te), 16)])
        train_patch = torch.cat([m.patch_scores(tr[i:i+16]) for i in range(0, len(tr), 16)])
        torch.save(dict(patch_scores=patch, train_patch_scores=train_patch, labels=d["labels"], masks=d["masks"]), os.environ["MOLEFLOW_TUNE_DUMP"])
scores = torch.cat(scores); maps = torch.cat(maps)[:, 0]
# the continual evaluation's metrics (rescaled to [0, 1] in float64: no torchmetrics sigmoid on raw NLLs)
res = _metrics(scores, maps, d["labels"], d["masks"].bool())
ia, pa, ap = res["image_AUROC"], res["pixel_AUROC"], res["pixel_AP"]
print(json.dumps(dict(cat=cat, ep=epochs, lr=lr, kw=kw, img=round(ia,4), pix=round(pa,4), ap=round(ap,4), loss=round(tot/ (len(tr)/16),3), train_s=round(ttrain,1))))
