"""Flow-only screening of settings: one task, or a task then a second one (expert only).

    python benchmarks/tuning/tune_parts.py bottle 16 '{"context_kernel": 3}'                 # task 0 only
    python benchmarks/tuning/tune_parts.py bottle 16 '{"context_kernel": 3}' transistor 32   # then task 1

Prints one JSON line: per task, image / pixel AUROC of the flow NLL map (``nll``), of the
latent term alone (``z2``), and pixel AUROC of log(NLL) (``lognll``). The global score and
the position Gaussian are off (flow only). ``DUMP=<prefix>`` saves each task's latent term
and log-det for post-hoc scoring (``posthoc_position_gaussian.py``); ``SEED`` sets the seed.
Reads the features cached by ``cache_features.py`` (``MOLEFLOW_TUNE_CACHE``).
"""
import torch, sys, math, json, os, time
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from anomalib_moleflow import MoLEFlowConfig, MoLEFlowModel
from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss
from anomalib_moleflow.models.moleflow.anomaly_map import SeparableGaussianBlur
torch.manual_seed(int(os.environ.get("SEED", 0))); torch.set_num_threads(1)
cat, ep = sys.argv[1], int(sys.argv[2]); kw = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
kw.setdefault("global_score_weight", 0.0); kw.setdefault("position_gaussian_weight", 0.0)
cfg = MoLEFlowConfig(pre_trained=False, **kw)
m = MoLEFlowModel(cfg); pos = m.feature_extractor.position_embedding
loss_fn = MoLEFlowLoss(cfg.tail_weight, cfg.tail_top_ratio, cfg.logdet_reg)
NOISE = float(os.environ.get("NOISE", 0))  # feature noise during training (relative to the feature spread)
CACHE = os.environ.get("MOLEFLOW_TUNE_CACHE", "results/tuning")
def load(c):
    agg = cfg.feature_aggregation_kernel
    d = torch.load(f"{CACHE}/feats_{c}_{cfg.backbone}_{cfg.image_size}{'' if agg == 3 else f'_agg{agg}'}.pt")
    if cfg.grid_downsample > 1:
        for k in ("train", "test"):
            d[k] = F.avg_pool2d(d[k].permute(0, 3, 1, 2), cfg.grid_downsample, ceil_mode=True).permute(0, 2, 3, 1).contiguous()
    return d
def train(key, tr, epochs):
    params = m.prepare_task_training(key)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * math.ceil(len(tr) / 16)))
    for e in range(epochs):
        perm = torch.randperm(len(tr)); m.train()
        for i in range(0, len(tr), 16):
            x = tr[perm[i:i+16]]
            if NOISE: x = x + NOISE * torch.randn_like(x) * x.std()
            z, ld = m.flow_forward(x); loss, _ = loss_fn(z, ld); loss = loss + m.regularization()
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip); opt.step(); sched.step()
def evaluate(key, d, name):
    m.eval(); out = {}
    masks = d["masks"]; M = masks.flatten().numpy() > 0.5; y = d["labels"].numpy()
    with torch.no_grad():
        parts = {"z2": [], "ld": []}
        for split in ("train", "test"):
            x = d[split] + pos; zz, ll = [], []
            for i in range(0, len(x), 16):
                z, ld = m.flow_forward(x[i:i+16], key); zz.append(0.5 * (z ** 2).sum(-1)); ll.append(ld)
            parts[split] = (torch.cat(zz), torch.cat(ll))
    z2, ld = parts["test"]
    def pix(P, s=4):
        a = F.interpolate(P[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        a = SeparableGaussianBlur(s, 2 * int(4 * s + 0.5) + 1)(a)[:, 0]
        return round(roc_auc_score(M, a.flatten().numpy()), 4)
    img = lambda P: round(roc_auc_score(y, P.flatten(1).topk(3, 1).values.mean(1).numpy()), 4)
    nll = z2 - ld
    out = dict(nll=(img(nll), pix(nll)), z2=(img(z2), pix(z2)), lognll=pix(torch.log(nll - nll.min() + 1)))
    if os.environ.get("DUMP"):
        torch.save(dict(test=parts["test"], train=parts["train"], labels=d["labels"], masks=masks), f"{os.environ['DUMP']}_{name}.pt")
    return out
t = time.time()
res = {}
b = load(cat); m.add_task(); train("0", b["train"] + pos, ep); res[cat] = evaluate("0", b, cat)
if len(sys.argv) > 5:
    c2, ep1 = sys.argv[4], int(sys.argv[5]); d2 = load(c2); m.add_task(); train("1", d2["train"] + pos, ep1); res[c2] = evaluate("1", d2, c2)
print(json.dumps(dict(kw=kw, ep=ep, noise=NOISE, seed=os.environ.get("SEED", 0), res=res, s=round(time.time() - t))), flush=True)
