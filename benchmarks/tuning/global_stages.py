"""Mahalanobis image AUROC of globally pooled backbone stages, and their fusion with saved flow scores.

    python benchmarks/tuning/global_stages.py [dump prefix]   # e.g. results/tuning/cdump  (reads <prefix>_0.pt, <prefix>_1.pt)

Behind global_score_layers=(4,): stride-8 / stride-16 / stride-32 stages alone and together.
"""
import os, sys
import torch, glob, numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from anomalib_moleflow.backbones import create_feature_extractor, backbone_normalization
from anomalib_moleflow.continual.routers import ledoit_wolf_covariance
torch.set_num_threads(1)
bb = create_feature_extractor("tf_efficientnet_lite0", out_indices=(2, 3, 4), pretrained=True, img_size=256).eval()
mean, std = backbone_normalization("tf_efficientnet_lite0")
mean = torch.tensor(mean)[:, None, None]; std = torch.tensor(std)[:, None, None]
def load(p):
    im = Image.open(p).convert("RGB").resize((256, 256), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 - mean) / std
root = os.environ.get("MVTEC_ROOT", "../shared/data/mvtec_ad")
CACHE = os.environ.get("MOLEFLOW_TUNE_CACHE", "results/tuning")
for cat in ("transistor", "bottle"):
    out = {}
    for split, pat in (("train", f"{root}/{cat}/train/good/*.png"), ("test", f"{root}/{cat}/test/*/*.png")):
        paths = sorted(glob.glob(pat)); feats = []
        with torch.no_grad():
            for i in range(0, len(paths), 16):
                maps = bb(torch.stack([load(p) for p in paths[i:i + 16]]))
                feats.append(torch.cat([m.mean((2, 3)) for m in maps], 1))
        out[split] = torch.cat(feats)
        if split == "test": y = np.array([0 if "/good/" in p else 1 for p in paths])
    for name, sl in (("s8", slice(0, 40)), ("s16", slice(40, 152)), ("s8+s16", slice(0, 152)), ("s32", slice(152, 472)), ("all", slice(0, 472)), ("s16+s32", slice(40, 472))):
        tr = out["train"][:, sl].double(); te = out["test"][:, sl].double()
        mu = tr.mean(0); inv = torch.linalg.inv(ledoit_wolf_covariance(tr - mu) + 1e-6 * torch.eye(tr.shape[1]).double())
        s = ((te - mu) @ inv * (te - mu)).sum(1)
        print(cat, name, round(roc_auc_score(y, s.numpy()), 4))
    torch.save(out, f"{CACHE}/global_{cat}.pt")
if len(sys.argv) > 1:  # fuse with the flow scores of a tune_continual dump
    for cat, key in (("transistor", 1), ("bottle", 0)):
        D = torch.load(f"{sys.argv[1]}_{key}.pt"); P = D["test_patch_scores"]; TP = D["train_patch_scores"]; y = D["labels"].numpy()
        G = torch.load(f"{CACHE}/global_{cat}.pt")
        for name, sl in (("all", slice(0, 472)), ("s32", slice(152, 472)), ("s16+s32", slice(40, 472))):
            tr = G["train"][:, sl].double(); te = G["test"][:, sl].double()
            mu = tr.mean(0); inv = torch.linalg.inv(ledoit_wolf_covariance(tr - mu) + 1e-6 * torch.eye(tr.shape[1]).double())
            maha = lambda x: ((x - mu) @ inv * (x - mu)).sum(1)
            gt, gs = maha(tr), maha(te)
            row = []
            for k in (3, 10):
                ft = TP.flatten(1).topk(k, 1).values.mean(1).double(); fs = P.flatten(1).topk(k, 1).values.mean(1).double()
                for w in (0.5, 1.0, 2.0):
                    zf = (fs - ft.mean()) / ft.std(); zg = (gs - gt.mean()) / gt.std()
                    row.append(f"k{k} w{w}: {roc_auc_score(y, (zf + w * zg).numpy()):.4f}")
            print(cat, name, "; ".join(row))
