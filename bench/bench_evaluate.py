"""Time evaluate.py's work for 50,000 samples against a 10,000-image reference batch: the Inception
features of both (evaluate.features: fp32, TF32 off, batch 250 as evaluate.py's default) and the
five metrics (evaluate.mean_cov, frechet_distance, inception_score, precision_recall, as
evaluate.metrics calls them).

Random-weight evaluate.InceptionV3 (the real shapes; the weights do not change the time) and random
uint8 images of ImageNet-256 shape, made on the GPU and held in memory (reading an .npz from disk
is left out: sample.py writes it uncompressed and evaluate.py memory-maps it).

  python bench/bench_evaluate.py                                      # 50,000 vs 10,000, one GPU
  python bench/bench_evaluate.py --samples 300 --ref 200 --device cpu  # a smoke test
Prints one JSON line.
"""
import argparse, json, os, sys, time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evaluate  # noqa: E402


def random_images(n, device, chunk=1000):
    """uint8 (n, 256, 256, 3), drawn on the device in chunks."""
    out = np.empty((n, 256, 256, 3), np.uint8)
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        out[i:i + k] = torch.randint(0, 256, (k, 256, 256, 3), dtype=torch.uint8, device=device).cpu().numpy()
    return out


def random_inception(device):
    net = evaluate.InceptionV3()
    # He initialisation keeps the activations' scale through the ~90 conv layers (PyTorch's default
    # conv init shrinks them layer by layer), so the features are as well conditioned as real ones.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.to(device).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--ref", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = random_inception(dev)
    ref_images, sample_images = random_images(a.ref, dev), random_images(a.samples, dev)
    evaluate.features(net, ref_images[:a.batch_size], a.batch_size, progress=False)  # warm-up: cuDNN plans

    times = {}

    def clock(name, fn):
        sync(); t0 = time.time()
        out = fn()
        sync(); times[name] = round(time.time() - t0, 2)
        return out

    start = time.time()
    ref = clock("features_ref", lambda: evaluate.features(net, ref_images, a.batch_size, progress=False))
    sam = clock("features_samples", lambda: evaluate.features(net, sample_images, a.batch_size, progress=False))
    # evaluate.reference_statistics and evaluate.metrics, part by part.
    stats = clock("mean_cov", lambda: [evaluate.mean_cov(f[k]) for f in (ref, sam) for k in ("pool", "spatial")])
    (mu_r, sig_r), (mus_r, sigs_r), (mu, sig), (mus, sigs) = stats
    fid = clock("fid", lambda: evaluate.frechet_distance(mu_r, sig_r, mu, sig))
    sfid = clock("sfid", lambda: evaluate.frechet_distance(mus_r, sigs_r, mus, sigs))
    inception_score = clock("inception_score", lambda: evaluate.inception_score(sam["logits"]))
    precision, recall = clock("precision_recall", lambda: evaluate.precision_recall(ref["pool"], sam["pool"]))
    total = time.time() - start
    n = a.ref + a.samples
    print(json.dumps(dict(what="evaluate", samples=a.samples, ref=a.ref, batch_size=a.batch_size, device=str(dev),
                          seconds=round(total, 1), img_per_s_features=round(n / (times["features_ref"] + times["features_samples"]), 1),
                          parts_s=times, fid=round(fid, 3), sfid=round(sfid, 3), inception_score=round(inception_score, 3),
                          precision=round(precision, 4), recall=round(recall, 4),
                          peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev.type == "cuda" else 0.0)),
          flush=True)


if __name__ == "__main__":
    main()
