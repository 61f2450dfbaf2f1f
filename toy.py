"""The built-in world's two small trained networks: the teacher REG aligns with, and the classifier
that scores samples. Both are trained here, on the built-in images (data.py), in minutes on a CPU.

  encoder    a small ViT of the DINOv2 design (encoder.BuiltinViT: class token, patch tokens,
             final norm), pretrained on the SiT's training images; train.py loads it with
             --enc-type builtin-vit --enc-path FILE, through the same code path as DINOv2.
             Two teachers (TEACHERS): "label", whose class token is trained on the class alone,
             and "rich", whose class token is also trained on every global attribute of the image
             (data.ATTRIBUTES: colour, position, size, rotation, background).
  evaluator  a small CNN classifier trained on held-out images (never the SiT's, never the
             teacher): its pooled features play Inception's pool_3 for FID, precision and
             recall (evaluate.py's own frechet_distance and precision_recall), and its logits
             give the conditional accuracy (share of samples classified as the class asked for).

    python toy.py encoder --out runs/toy/encoder-p8.pt     # prints its linear-probe accuracy
    python toy.py encoder --teacher rich --out runs/toy/encoder-rich-p8.pt   # and per-attribute probes
    python toy.py evaluator --out runs/toy/evaluator.pt    # prints its accuracy and sanity FIDs
    python toy.py vae --out runs/toy/vae-aligned           # the toy ReaLS VAE (--align-coeff 0: plain)

A third, for the ReaLS lab (labs/reals.py): `python toy.py vae`, a toy KL-VAE of the SD-VAE design,
plain or with its latents aligned to the teacher's tokens (ReaLS, arXiv 2502.00359; its section below).

The images of each role come from their own seed of the dataset (SEEDS), so the SiT's training
set, the evaluator's training set and the FID reference set never share an image.
"""
import json
import math
import os
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
from data import ATTRIBUTES, BUILTIN_DATASETS
from encoder import AutoencoderKL, BuiltinViT, save_vae_folder
from util import ArgumentParser, UserError, number, run

# Dataset seed of each role. "train" is the seed train.py's built-in run uses (data.BuiltinShapes()).
SEEDS = {"train": 0, "evaluator": 1, "reference": 2}
TEACHERS = ("label", "rich")  # what the teacher's class token is trained on (train_encoder)


def images(variant="hard", role="reference", num_images=5000, resolution=32):
    """The built-in images of one role -> (uint8 (N, 3, R, R), int64 labels (N,)); balanced classes."""
    dataset = BUILTIN_DATASETS[variant](num_images, resolution, seed=SEEDS[role])
    return torch.from_numpy(dataset.images), torch.from_numpy(dataset.labels).long()


def attributes(variant="hard", role="reference", num_images=5000, resolution=32):
    """The global attributes of the same images as images(): name -> float32 (N, k) (data.ATTRIBUTES);
    empty for a dataset that draws none (the easy shapes)."""
    dataset = BUILTIN_DATASETS[variant](num_images, resolution, seed=SEEDS[role])
    return {k: torch.from_numpy(v).float() for k, v in getattr(dataset, "attributes", {}).items()}


def _batches(n, batch_size, generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def check_writable(path):
    """Fail in one line before training, not with a traceback after it, when `path` cannot be
    written: its folder is made and a probe file created and removed there."""
    folder = os.path.dirname(path) or "."
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "a folder")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(20, f"{folder} is a file")
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); give --out a file in a writable folder") from e


def _fit(parameters, loss_of, n, epochs, batch_size, lr, seed):
    """AdamW with a cosine learning rate over `epochs` passes of shuffled batches; loss_of(indices)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    steps = epochs * (n // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        for batch in _batches(n, batch_size, generator):
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()


# ----------------------------------------------------------------------------- the teacher

def train_encoder(out_path, variant="hard", num_images=5000, resolution=32, epochs=5, batch_size=64,
                  lr=2e-3, seed=0, probe_images=2000, device="cpu", teacher="label", **config):
    """Pretrain encoder.BuiltinViT on the training images, save it to out_path, return the path.

    Objective of teacher "label": supervised classification of the class token (cross-entropy
    through a linear head that is thrown away). Why not DINO/iBOT self-distillation, DINOv2's own
    objective (arXiv 2304.07193)? What REG uses of DINOv2 is a class token whose content is the image's semantics
    (REG 2507.01467, Sec. 3: "global semantic information"), and patch tokens that carry local
    structure for REPA's alignment. Self-distillation reaches that only after many epochs of
    multi-crop training, far beyond 2 minutes on a CPU; labels give it in a few epochs. The cost:
    this teacher's class token is close to the label, which a class-conditional SiT already has.
    Teacher "rich" adds a regression of every global attribute of the image (data.ATTRIBUTES,
    each standardised; squared error through a linear head on the same class token, summed with
    the cross-entropy): its class token knows the image's colour, position, size, rotation and
    background besides its class, as DINOv2's carries more of an image than its ImageNet label.
    """
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; choose one of {TEACHERS}")
    check_writable(out_path)
    x, y = images(variant, "train", num_images, resolution)
    targets = None
    if teacher == "rich":
        if not attributes(variant, "train", 10, resolution):
            raise ValueError(f"the rich teacher needs a dataset with attributes (hard), not {variant!r}")
        values = torch.cat([attributes(variant, "train", num_images, resolution)[k] for k in ATTRIBUTES], 1)  # (N, A)
        targets = ((values - values.mean(0)) / values.std(0)).to(device)
    torch.manual_seed(seed)
    net = BuiltinViT(resolution, **config).to(device)
    net.vit.requires_grad_(True).train()
    classes = len(BUILTIN_DATASETS[variant].class_names)
    head = nn.Linear(net.z_dim, classes + (0 if targets is None else targets.shape[1])).to(device)

    def loss_of(batch):
        cls = net.vit.forward_features(net.preprocess(x[batch].to(device)))[:, 0]  # (n, z_dim) after the final norm
        out = head(cls)  # (n, classes [+ A])
        loss = F.cross_entropy(out[:, :classes], y[batch].to(device))
        if targets is not None:
            loss = loss + F.mse_loss(out[:, classes:], targets[batch.to(device)])
        return loss

    start = time.time()
    _fit([*net.vit.parameters(), *head.parameters()], loss_of, len(x), epochs, batch_size, lr, seed)
    net.requires_grad_(False).eval()
    probes = probe_table(net.cpu(), variant, resolution, probe_images)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    torch.save({"kind": "builtin-vit", "config": net.config, "variant": variant, "state_dict": net.vit.state_dict(),
                "teacher": teacher, "probe_accuracy": probes["class"], "probes": probes}, out_path)
    print(f"encoder ({teacher} teacher): {time.time() - start:.0f} s of pretraining on {len(x)} {variant} images; "
          f"linear probes on its class token (held out; class: accuracy, chance {1 / classes:.2f}; attributes: "
          f"R^2, chance 0): " + ", ".join(f"{k} {v:.3f}" for k, v in probes.items()) + f" -> {out_path}")
    return out_path


@torch.no_grad()
def _tokens(net, x, batch_size=500):
    return torch.cat([net(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])  # (N, z_dim)


def linear_probe(net, variant="hard", resolution=32, num_images=2000, epochs=30, seed=0):
    """Held-out accuracy of a linear classifier on the frozen class token: fitted on training
    images' tokens, tested on the reference images' (the standard probe of DINOv2, Sec. 7)."""
    x_train, y_train = images(variant, "train", num_images, resolution)
    x_test, y_test = images(variant, "reference", num_images, resolution)
    f_train, f_test = _tokens(net, x_train), _tokens(net, x_test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    probe = nn.Linear(f_train.shape[1], int(y_train.max()) + 1)
    with torch.enable_grad():
        _fit(probe.parameters(), lambda b: F.cross_entropy(probe(f_train[b]), y_train[b]), len(f_train),
             epochs, 100, 1e-2, seed)
    return (probe(f_test).argmax(1) == y_test).float().mean().item()


def probe_table(net, variant="hard", resolution=32, num_images=2000):
    """What a teacher's class token carries: {"class": linear-probe accuracy, attribute: R^2 of a
    linear (ridge) regression on the token}, each fitted on training images' tokens and scored on
    the held-out reference images'. R^2 = 1 - held-out squared error / variance, over the
    attribute's components; 0 is what a constant guess scores."""
    table = {"class": linear_probe(net, variant, resolution, num_images)}
    f_train = _tokens(net, images(variant, "train", num_images, resolution)[0]).double()
    f_test = _tokens(net, images(variant, "reference", num_images, resolution)[0]).double()
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train = torch.cat([(f_train - mean) / std, torch.ones(len(f_train), 1, dtype=f_train.dtype)], 1)
    f_test = torch.cat([(f_test - mean) / std, torch.ones(len(f_test), 1, dtype=f_test.dtype)], 1)
    a_train, a_test = attributes(variant, "train", num_images, resolution), attributes(variant, "reference", num_images, resolution)
    for name in a_train:
        _, table[name] = ridge_fit(f_train, a_train[name].double(), f_test, a_test[name].double(), ridge=1e-2)
    return table


def ridge_fit(f_fit, a_fit, f_test, a_test, ridge):
    """Ridge regression of an attribute a (N, k) on features f (N, F), a bias column included:
    -> its weights (F, k) and their held-out R^2 = 1 - squared error / variance, the mean over the
    attribute's k components (0 is what a constant guess scores). ridge is per fitted image."""
    eye = ridge * len(f_fit) * torch.eye(f_fit.shape[1], dtype=f_fit.dtype)
    w = torch.linalg.solve(f_fit.T @ f_fit + eye, f_fit.T @ a_fit)  # (F, k)
    error = (f_test @ w - a_test).square().sum(0)
    return w, (1 - error / (a_test - a_test.mean(0)).square().sum(0)).mean().item()


# ----------------------------------------------------------------------------- the evaluator

class ToyEvaluator(nn.Module):
    """uint8 images (N, 3, R, R) -> (features (N, width * 4), logits (N, num_classes)).

    Four 3x3 convolutions (three of stride 2) and a global average pool: the pooled vector is
    the feature for FID / precision / recall, as Inception's pool_3 is for ImageNet, and a
    linear layer on it gives the logits. No normalisation layers: no train/eval difference.
    """

    def __init__(self, num_classes=10, width=32):
        super().__init__()
        widths = [3, width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                                    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
        self.head = nn.Linear(widths[-1], num_classes)
        self.config = dict(num_classes=num_classes, width=width)

    def forward(self, images):
        h = images.float() / 127.5 - 1  # (N, 3, R, R) in [-1, 1]
        for conv in self.convs:
            h = F.relu(conv(h))  # (N, w, R, R), then halved three times
        features = h.mean(dim=(2, 3))  # (N, 4w)
        return features, self.head(features)


def train_evaluator(out_path, variant="hard", num_images=5000, resolution=32, epochs=4, batch_size=64,
                    lr=3e-3, seed=0, width=32, sanity_images=2000):
    """Train ToyEvaluator on the held-out "evaluator" images (seeded, deterministic on a CPU), save
    it to out_path, print its sanity figures and return the path."""
    check_writable(out_path)
    x, y = images(variant, "evaluator", num_images, resolution)
    torch.manual_seed(seed)
    net = ToyEvaluator(len(BUILTIN_DATASETS[variant].class_names), width)
    start = time.time()
    _fit(net.parameters(), lambda b: F.cross_entropy(net(x[b])[1], y[b]), len(x), epochs, batch_size, lr, seed)
    net.requires_grad_(False).eval()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    torch.save({"kind": "toy-evaluator", "config": net.config, "variant": variant, "resolution": resolution,
                "state_dict": net.state_dict()}, out_path)
    print(f"evaluator: {time.time() - start:.0f} s of training on {len(x)} held-out {variant} images -> {out_path}")
    for name, value in sanity_figures(net, variant, resolution, sanity_images).items():
        print(f"  {name}: {value:.4g}")
    return out_path


def sanity_figures(net, variant="hard", resolution=32, n=2000):
    """What a working evaluator must show: reference images vs the evaluator's own training images
    score a small FID and a high accuracy; uniform noise and one repeated image a large FID."""
    reference, labels = images(variant, "reference", n, resolution)
    own, _ = images(variant, "evaluator", n, resolution)
    noise = torch.randint(0, 256, reference.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    real = toy_metrics(net, own, labels, reference)
    with warnings.catch_warnings():  # one repeated image has a zero covariance: singular, as expected
        warnings.simplefilter("ignore")
        repeated = toy_metrics(net, reference[:1].expand_as(reference), labels, reference)
    return {"held-out accuracy": toy_metrics(net, reference, labels, reference)["accuracy"],
            "FID held-out vs evaluator-training images": real["fid"],
            "precision of the same": real["precision"], "recall of the same": real["recall"],
            "FID uniform noise": toy_metrics(net, noise, labels, reference)["fid"],
            "FID one repeated image": repeated["fid"]}


def load_evaluator(path, device="cpu"):
    """The frozen ToyEvaluator saved by train_evaluator."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = ToyEvaluator(**state["config"])
    net.load_state_dict(state["state_dict"])
    return net.requires_grad_(False).eval().to(device)


class AttributeReader:
    """Reads the global attributes (data.ATTRIBUTES) of any images, generated ones included: a ridge
    regression per attribute on the evaluator's pooled features, fitted on the evaluator's own
    held-out images. `r2` is its held-out R^2 per attribute (on the reference images): how far
    each reading can be trusted."""

    def __init__(self, evaluator, variant="hard", resolution=32, num_images=2000, ridge=1e-3):
        self.evaluator = evaluator
        fit, test = (images(variant, role, num_images, resolution)[0] for role in ("evaluator", "reference"))
        f_fit, f_test = self.features(fit), self.features(test)
        a_fit, a_test = (attributes(variant, role, num_images, resolution) for role in ("evaluator", "reference"))
        self.weights, self.r2 = {}, {}
        for name in a_fit:
            self.weights[name], self.r2[name] = ridge_fit(f_fit, a_fit[name].double(), f_test, a_test[name].double(), ridge)
        self.scale = {name: a_fit[name].double().std(0) for name in a_fit}  # to compare attributes in std units

    @torch.no_grad()
    def features(self, x, batch_size=500):
        device = next(self.evaluator.parameters()).device
        f = torch.cat([self.evaluator(x[i:i + batch_size].to(device))[0] for i in range(0, len(x), batch_size)])
        return torch.cat([f.double().cpu(), torch.ones(len(f), 1, dtype=torch.float64)], 1)  # (N, width + 1)

    def __call__(self, x):
        """uint8 images (N, 3, R, R) -> {attribute: (N, k) in units of its std over the data}."""
        f = self.features(x)
        return {name: (f @ w) / self.scale[name] for name, w in self.weights.items()}


@torch.no_grad()
def toy_metrics(evaluator, samples, labels, reference, batch_size=500):
    """FID, precision, recall and conditional accuracy of samples against reference images.

    samples, reference: uint8 (N, 3, R, R); labels: (N,) the classes the samples were asked for
    (accuracy = share of samples the evaluator assigns to their label). FID and precision/recall
    are evaluate.py's frechet_distance and precision_recall (k = 3) on the pooled features.
    """
    device = next(evaluator.parameters()).device

    def run_net(x):
        parts = [evaluator(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
        return torch.cat([f for f, _ in parts]).double().cpu().numpy(), torch.cat([g for _, g in parts]).cpu()

    feats, logits = run_net(samples)
    ref_feats, _ = run_net(reference)
    mu, sigma = evaluate.mean_cov(feats)
    mu_ref, sigma_ref = evaluate.mean_cov(ref_feats)
    precision, recall = evaluate.precision_recall(ref_feats, feats, device=device)
    return {"fid": float(evaluate.frechet_distance(mu_ref, sigma_ref, mu, sigma)), "precision": precision,
            "recall": recall, "accuracy": (logits.argmax(1) == labels.cpu()).double().mean().item()}


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, default in (("encoder", "runs/toy/encoder-p{patch_size}.pt"), ("evaluator", "runs/toy/evaluator.pt")):
        p = commands.add_parser(name, help=f"train the {name} and save it")
        p.add_argument("--out", default=default, help="file to write (where labs/reg_vs_repa.py looks)")
        p.add_argument("--variant", default="hard", choices=sorted(BUILTIN_DATASETS), help="built-in dataset")
        p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="initialisation and batch order")
        if name == "encoder":
            p.add_argument("--patch-size", type=number(int, 1), default=8, help="the SiT's patch size: REPA aligns patch with patch")
            p.add_argument("--teacher", default="label", choices=TEACHERS, help="what its class token is trained on")
    add_vae_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "vae":
        return vae_main(args)
    if args.command == "encoder":
        train_encoder(args.out.format(patch_size=args.patch_size), variant=args.variant, seed=args.seed,
                      patch_size=args.patch_size, teacher=args.teacher)
    else:
        train_evaluator(args.out, variant=args.variant, seed=args.seed)


# ----------------------------------------------------------------------------- the toy VAE (ReaLS)
#
# ReaLS (arXiv 2502.00359) trains the VAE with an alignment network, an MLP from its latents to
# DINOv2's features at the patch level and the global level; its training code is not public.
# Our reading, at toy scale, with the toy teacher (BuiltinViT) in DINOv2's place:
#   loss = MSE(x, decode(z)) + KL_COEFF * KL(q(z|x) || N(0, I)) + align_coeff * (L_patch + L_global)
#   z the posterior sample (the latent the diffusion model learns); L_patch = mean over the
#   teacher's T patches of 1 - cos(MLP(z's patch), teacher patch token), the latent patchified so
#   its grid is the teacher's (REPA's negative cosine, arXiv 2410.06940 Eq. 3); L_global = 1 -
#   cos(head(mean over patches of the MLP's hidden features), teacher class token). The KL is the
#   mean over latent numbers; the plain VAE is the same run with align_coeff = 0.
# The reconstruction term is MSE alone (the SD-VAE adds LPIPS and a GAN, LDM arXiv 2112.10752
# Sec. 3.1): at 32 pixels and 2 CPU minutes those would cost more than they show.

VAE_CONFIG = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, groups=8)  # 32 px -> (4, 8, 8)
KL_COEFF = 1e-3


class LatentAligner(nn.Module):
    """ReaLS's alignment network, our reading: latent (N, C, h, w) -> (patch features (N, T, D),
    global feature (N, D)), T = (h / patch)^2 tokens on the teacher's grid."""

    def __init__(self, latent_channels, patch, z_dim, hidden=256):
        super().__init__()
        self.patch = patch
        self.trunk = nn.Sequential(nn.Linear(latent_channels * patch * patch, hidden), nn.SiLU(),
                                   nn.Linear(hidden, hidden), nn.SiLU())
        self.to_patch, self.to_global = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, z):
        p = self.patch
        N, C, h, w = z.shape
        tokens = z.reshape(N, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)  # (N, T, C p p)
        hidden = self.trunk(tokens)  # (N, T, hidden)
        return self.to_patch(hidden), self.to_global(hidden.mean(1))  # (N, T, D), (N, D)


def alignment_loss(patches, cls, teacher_patches, teacher_cls):
    """L_patch + L_global: 1 - cosine similarity, averaged over tokens and images (the comment above)."""
    patch_term = 1 - F.cosine_similarity(patches, teacher_patches, dim=-1).mean()
    global_term = 1 - F.cosine_similarity(cls, teacher_cls, dim=-1).mean()
    return patch_term + global_term


def kl_loss(mean, std):
    """KL(N(mean, std^2) || N(0, 1)), averaged over the latent's numbers."""
    return 0.5 * (mean ** 2 + std ** 2 - 1 - 2 * torch.log(std)).mean()


def train_vae(out_dir, encoder_path=None, align_coeff=0.5, variant="hard", num_images=5000, resolution=32,
              epochs=4, batch_size=64, lr=2e-3, seed=0, probe_images=2000, device="cpu"):
    """Train a toy KL-VAE of the SD-VAE design (VAE_CONFIG), with the alignment to the teacher at
    encoder_path when align_coeff > 0; save it as a diffusers AutoencoderKL folder (no scaling
    factor: data.py prepare measures it) and return (folder, figures)."""
    check_writable(os.path.join(out_dir, "config.json"))
    x, y = images(variant, "train", num_images, resolution)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=None).to(device)
    vae.requires_grad_(True).train()
    parameters = list(vae.parameters())
    if align_coeff > 0:
        teacher = BuiltinViT.load(encoder_path, resolution).to(device)
        with torch.no_grad():  # the teacher is frozen: its tokens once, (N, D) and (N, T, D)
            parts = [teacher(x[i:i + 500].to(device)) for i in range(0, len(x), 500)]
            t_cls, t_patches = torch.cat([c for c, _ in parts]), torch.cat([p for _, p in parts])
        grid = resolution // vae.downsample
        aligner = LatentAligner(vae.latent_channels, grid // int(t_patches.shape[1] ** 0.5), teacher.z_dim).to(device)
        parameters += list(aligner.parameters())

    def loss_of(batch):
        images_ = x[batch].to(device).float() / 127.5 - 1
        mean, std = vae.posterior(images_)
        z = mean + std * torch.randn_like(mean)
        loss = F.mse_loss(vae.decoder(vae.post_quant_conv(z)), images_) + KL_COEFF * kl_loss(mean, std)
        if align_coeff > 0:
            loss = loss + align_coeff * alignment_loss(*aligner(z), t_patches[batch.to(device)], t_cls[batch.to(device)])
        return loss

    start = time.time()
    _fit(parameters, loss_of, len(x), epochs, batch_size, lr, seed)
    vae.requires_grad_(False).eval()
    save_vae_folder(vae.cpu(), out_dir)
    figures = {"seconds": time.time() - start, **vae_figures(vae, variant, resolution, probe_images)}
    with open(os.path.join(out_dir, "toy_vae.json"), "w") as f:
        json.dump({"align_coeff": align_coeff, "kl_coeff": KL_COEFF, "epochs": epochs, "variant": variant,
                   "encoder": encoder_path, **figures}, f, indent=1)
    print(f"toy VAE ({'aligned, ' + str(align_coeff) if align_coeff > 0 else 'plain'}): {figures['seconds']:.0f} s; "
          f"reconstruction PSNR {figures['psnr']:.2f} dB, linear probe on its latents "
          f"{figures['probe_accuracy']:.3f} -> {out_dir}")
    return out_dir, figures


@torch.no_grad()
def vae_figures(vae, variant="hard", resolution=32, num_images=2000):
    """Reconstruction PSNR (dB, pixels in [0, 255]) of held-out images through the posterior mean,
    their reconstructions as uint8, and the held-out accuracy of a linear probe on the flattened
    posterior mean (fitted on training images' latents, as linear_probe on the class token)."""
    x_test, y_test = images(variant, "reference", num_images, resolution)
    x_train, y_train = images(variant, "train", num_images, resolution)

    def means(x):
        return torch.cat([vae.encode(x[i:i + 500].float() / 127.5 - 1)[0] for i in range(0, len(x), 500)])

    m_test = means(x_test)
    recon = torch.cat([vae.decode(m_test[i:i + 500]) for i in range(0, len(m_test), 500)])
    recon = torch.clamp(255 * (recon + 1) / 2, 0, 255).round()  # as util.to_uint8
    mse = ((recon - x_test.float()) ** 2).mean().item()
    f_train, f_test = means(x_train).flatten(1), m_test.flatten(1)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    probe = nn.Linear(f_train.shape[1], int(y_train.max()) + 1)
    with torch.enable_grad():
        _fit(probe.parameters(), lambda b: F.cross_entropy(probe(f_train[b]), y_train[b]), len(f_train), 30,
             min(100, len(f_train)), 1e-2, 0)
    return {"psnr": 10 * math.log10(255 ** 2 / mse), "probe_accuracy": (probe(f_test).argmax(1) == y_test).float().mean().item()}


def vae_main(args):
    if args.align_coeff > 0 and not os.path.isfile(args.enc_path):
        raise UserError(f"the aligned VAE needs the teacher {args.enc_path}; make it with: python toy.py encoder "
                        f"--variant {args.variant} (or give --align-coeff 0 for the plain VAE)")
    train_vae(args.out, args.enc_path, args.align_coeff, variant=args.variant, seed=args.seed, epochs=args.epochs)


def add_vae_parser(commands):
    p = commands.add_parser("vae", help="train the toy KL-VAE, aligned with the teacher (ReaLS) or plain")
    p.add_argument("--out", default="runs/toy/vae-aligned", help="diffusers AutoencoderKL folder to write")
    p.add_argument("--align-coeff", type=number(float, 0), default=0.5, help="alignment weight; 0: the plain VAE")
    p.add_argument("--enc-path", default="runs/toy/encoder-p8.pt", help="the teacher (python toy.py encoder)")
    p.add_argument("--variant", default="hard", choices=sorted(BUILTIN_DATASETS), help="built-in dataset")
    p.add_argument("--epochs", type=number(int, 1), default=4, help="passes over the 5,000 training images")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="initialisation and batch order")


if __name__ == "__main__":
    run(main)
