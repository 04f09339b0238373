"""Per-position standardisation of patch NLLs before the anomaly map (tuning README: lowered pixel AUROC).

    python benchmarks/tuning/posthoc_pixel.py results/tuning/cdump_1.pt
"""
import torch, sys
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from anomalib_moleflow.models.moleflow.anomaly_map import SeparableGaussianBlur
D = torch.load(sys.argv[1]); P = D["test_patch_scores"]; TP = D["train_patch_scores"]; masks = D["masks"]; y = D["labels"].numpy()
def pix(Pm, sigma=4):
    amap = F.interpolate(Pm[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)
    amap = SeparableGaussianBlur(sigma, 2 * int(4 * sigma + 0.5) + 1)(amap)[:, 0]
    return round(roc_auc_score(masks.flatten().numpy() > 0.5, amap.flatten().numpy()), 4)
def img(Pm, k=3): return round(roc_auc_score(y, Pm.flatten(1).topk(k, 1).values.mean(1).numpy()), 4)
mu, sd = TP.mean(0), TP.std(0)
print("raw", pix(P), img(P))
for a in (0.5, 1.0):
    Z = (P - mu) / sd.clamp_min(1e-3) ** a
    print("z pos a", a, pix(Z), img(Z), img(Z, 10))
Zm = P - mu
print("centered", pix(Zm), img(Zm), img(Zm, 10))
# smooth stats over neighbours (few train images)
k = 3
mus = F.avg_pool2d(mu[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]; sds = F.avg_pool2d(sd[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
print("z smoothed", pix((P - mus) / sds), img((P - mus) / sds))
