"""Cache frozen-backbone features of bottle and transistor for quick flow tuning (see README.md).

    python benchmarks/tuning/cache_features.py [image_size] [backbone]
"""
import torch, sys, os, glob, numpy as np
from PIL import Image
from anomalib_moleflow import MoLEFlowConfig, MoLEFlowModel
from anomalib_moleflow.backbones import backbone_normalization
size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
backbone = sys.argv[2] if len(sys.argv) > 2 else "tf_efficientnet_lite0"
agg = int(os.environ.get("MOLEFLOW_TUNE_AGG", "3"))  # feature_aggregation_kernel of the cached features
suffix = "" if agg == 3 else f"_agg{agg}"
cfg = MoLEFlowConfig(image_size=size, backbone=backbone, use_position_embedding=False, feature_aggregation_kernel=agg, grid_downsample=1, global_score_weight=0.0)
m = MoLEFlowModel(cfg).eval()
mean, std = backbone_normalization(backbone)
mean = torch.tensor(mean)[:, None, None]; std = torch.tensor(std)[:, None, None]
def load(p):
    im = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(im)).permute(2,0,1).float()/255 - mean)/std
root = os.environ.get("MVTEC_ROOT", "../shared/data/mvtec_ad")
CACHE = os.environ.get("MOLEFLOW_TUNE_CACHE", "results/tuning"); os.makedirs(CACHE, exist_ok=True)
for cat in ["bottle", "transistor"]:
    out = {}
    tr = sorted(glob.glob(f"{root}/{cat}/train/good/*.png"))
    te = sorted(glob.glob(f"{root}/{cat}/test/*/*.png"))
    for name, paths in [("train", tr), ("test", te)]:
        feats = []
        with torch.no_grad():
            for i in range(0, len(paths), 16):
                feats.append(m.extract_features(torch.stack([load(p) for p in paths[i:i+16]])))
        out[name] = torch.cat(feats)
    labels = torch.tensor([0 if "/good/" in p else 1 for p in te])
    masks = []
    for p in te:
        if "/good/" in p: masks.append(torch.zeros(size, size))
        else:
            mp = p.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            mk = Image.open(mp).convert("L").resize((size, size), Image.NEAREST)
            masks.append(torch.from_numpy(np.asarray(mk) > 127).float())
    out["labels"] = labels; out["masks"] = torch.stack(masks)
    torch.save(out, f"{CACHE}/feats_{cat}_{backbone}_{size}{suffix}.pt")
    print(cat, out["train"].shape, out["test"].shape)
