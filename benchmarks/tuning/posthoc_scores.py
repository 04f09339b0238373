"""Post-hoc image and pixel scoring on saved patch scores (tuning README, second/third round).

    MOLEFLOW_TUNE_DUMP=results/tuning/cdump python benchmarks/tuning/tune_continual.py 16 '{"grid_downsample": 2}'
    python benchmarks/tuning/posthoc_scores.py transistor results/tuning/cdump_1.pt

Top-k image scores, the pooled-patch Mahalanobis score alone and fused, and map smoothing sigma.
"""
import os
import torch, sys
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from anomalib_moleflow.continual.routers import ledoit_wolf_covariance
from anomalib_moleflow.models.moleflow.anomaly_map import SeparableGaussianBlur
cat, dump, size = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 256
D = torch.load(dump); P = D["patch_scores"] if "patch_scores" in D else D["test_patch_scores"]; TP = D["train_patch_scores"]; y = D["labels"].numpy(); masks = D["masks"]
f = torch.load(f"{os.environ.get('MOLEFLOW_TUNE_CACHE', 'results/tuning')}/feats_{cat}_tf_efficientnet_lite0_{size}.pt")
def topk(p, k): return p.flatten(1).topk(k, 1).values.mean(1)
for k in (1, 3, 5, 10, 20):
    print("topk", k, round(roc_auc_score(y, topk(P, k).numpy()), 4))
tr = f["train"].mean((1, 2)).double(); te = f["test"].mean((1, 2)).double()
mu = tr.mean(0); inv = torch.linalg.inv(ledoit_wolf_covariance(tr - mu))
maha = lambda x: ((x - mu) @ inv * (x - mu)).sum(1)
mt, ms = maha(tr), maha(te)
print("maha", round(roc_auc_score(y, ms.numpy()), 4))
for k in (3, 10):
    ft, fs = topk(TP, k).double(), topk(P, k).double()
    zf = (fs - ft.mean()) / ft.std(); zm = (ms - mt.mean()) / mt.std()
    for w in (0.25, 0.5, 1.0):
        print("fuse k", k, "w", w, round(roc_auc_score(y, (zf + w * zm).numpy()), 4))
for sigma in (2, 4, 6, 8):
    amap = F.interpolate(P[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)
    kern = 2 * int(4 * sigma + 0.5) + 1
    amap = SeparableGaussianBlur(sigma, kern)(amap)[:, 0]
    print("sigma", sigma, round(roc_auc_score(masks.flatten().numpy() > 0.5, amap.flatten().numpy()), 4))
