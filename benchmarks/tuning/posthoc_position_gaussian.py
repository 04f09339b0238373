"""Post-hoc: position-conditional Gaussian patch score alone and added to a saved flow NLL map.

    DUMP=results/tuning/d python benchmarks/tuning/tune_parts.py bottle 16 '{}' transistor 32
    python benchmarks/tuning/posthoc_position_gaussian.py bottle results/tuning/d_bottle.pt
    python benchmarks/tuning/posthoc_position_gaussian.py transistor results/tuning/d_transistor.pt

Behind ``position_gaussian_weight`` / ``position_gaussian_shrinkage`` (tuning README, fourth round).
"""
import os, torch, sys, numpy as np
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from anomalib_moleflow.models.moleflow.anomaly_map import SeparableGaussianBlur
torch.set_num_threads(1)
cat, dump = sys.argv[1], sys.argv[2]
D = torch.load(dump)
if "test_patch_scores" in D: P, TP = D["test_patch_scores"], D["train_patch_scores"]
else: P = D["test"][0] - D["test"][1]; TP = D["train"][0] - D["train"][1]
masks = D["masks"]; y = D["labels"].numpy()
d = torch.load(f"{os.environ.get('MOLEFLOW_TUNE_CACHE', 'results/tuning')}/feats_{cat}_tf_efficientnet_lite0_256.pt")
M = masks.flatten().numpy() > 0.5
def up(Pm, sigma=4):
    amap = F.interpolate(Pm[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return SeparableGaussianBlur(sigma, 2 * int(4 * sigma + 0.5) + 1)(amap)[:, 0]
def pix(Pm, sigma=4): return round(roc_auc_score(M, up(Pm, sigma).flatten().numpy()), 4)
def img(S, k=3): return round(roc_auc_score(y, S.flatten(1).topk(k, 1).values.mean(1).numpy()), 4)
def pool(x, g): return F.avg_pool2d(x.permute(0, 3, 1, 2), g).permute(0, 2, 3, 1)
def posgauss(tr, te, shrink=0.01):
    mu = tr.double().mean(0)
    R = (tr.double() - mu).reshape(-1, tr.shape[-1]); C = R.T @ R / (len(R) - 1)
    C = C + shrink * torch.eye(C.shape[0], dtype=C.dtype) * C.diagonal().mean(); Ci = torch.linalg.inv(C)
    f = lambda t: (((t.double() - mu) @ Ci) * (t.double() - mu)).sum(-1).float()
    return f(tr), f(te)
zn = lambda a, ref: (a - ref.mean()) / ref.std()
lz = lambda a, ref: zn(torch.log((a - ref.min()).clamp_min(0) + 1), torch.log(ref - ref.min() + 1))  # z-scored log scores
tr16, te16 = pool(d["train"], 2), pool(d["test"], 2)
print(cat, dump, "nll", pix(P), img(P))
X = tr16.reshape(-1, tr16.shape[-1]).double(); mu1 = X.mean(0); C1 = torch.cov(X.T)
C1 = C1 + 0.1 * torch.eye(C1.shape[0], dtype=C1.dtype) * C1.diagonal().mean(); C1i = torch.linalg.inv(C1)
one = lambda t: (((t.double() - mu1) @ C1i) * (t.double() - mu1)).sum(-1).float()
print("one Gaussian for all positions, alone", pix(one(te16)), img(one(te16)))
for sh in (0.001, 0.01, 0.1):
    Mtr, Mte = posgauss(tr16, te16, sh)
    print(f"shrink {sh} alone", pix(Mte), img(Mte), "log", pix(torch.log(Mte)))
    for w in (1, 2, 4, 8):
        Fz = lz(P, TP) + w * lz(Mte, Mtr)
        print(f"  z(log) fusion w{w}", pix(Fz), "img top3", img(Fz), "top10", img(Fz, 10))
Mtr, Mte = posgauss(tr16, te16, 0.1)  # the defaults' shrinkage
for w in (0.5, 1, 2, 4):
    S = P + w * 0.5 * Mte
    print(f"  flow NLL + w * Gaussian NLL, w{w}", pix(S), "img", img(S), "top10", img(S, 10))
