"""End-of-training probes of the representation: CLP and linear probes (paper 000 sec. 4.3).

CLP, cluster-and-linear-probe (docs/metrics.md "Losses and procedures"): inside each super-class (a
training label), the train features are reduced (t-SNE to 2-D as the paper, PCA, or not at all),
clustered with k-means into as many clusters as the super-class has original classes, and the
(super-class, cluster) pairs become pseudo-labels. A linear classifier fitted on the train features
with those labels then predicts the test set; inside each super-class its clusters are matched to
the original classes by the Hungarian method on the test predictions (equal to trying every
permutation), and the accuracy on the original test labels is reported. The linear probe on the true
original labels is the reference it is set beside.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

EMBEDDINGS = ("tsne", "pca", "none")


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster labels of the rows of x: faiss k-means (best of 10 restarts) when faiss is installed,
    else scikit-learn's. faiss clusters on every GPU it sees (``gpu=True`` asks faiss.get_num_gpus();
    faiss-cpu sees none and clusters on the CPU)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if k == 1 or x.shape[0] <= k:
        return np.arange(x.shape[0]) % k
    try:
        import faiss
    except ImportError:
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    km = faiss.Kmeans(x.shape[1], k, niter=50, nredo=10, seed=seed, verbose=False, gpu=True)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def embed(x: np.ndarray, how: str, seed: int = 0) -> np.ndarray:
    """The features CLP clusters: t-SNE to 2-D, PCA to 2-D, or the features themselves.

    Rows that are all the same (a super-class whose units all died) have no spread to embed: PCA
    and t-SNE would divide by it (scikit-learn's t-SNE then crashes the process), so they become
    the origin of the plane."""
    if how == "none" or x.shape[0] < 4:
        return x
    if how in EMBEDDINGS and not np.ptp(x, axis=0).any():
        return np.zeros((x.shape[0], 2), dtype=x.dtype)
    if how == "pca":
        return PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
    if how == "tsne":
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"embed: expected one of {EMBEDDINGS}, got {how!r}")


class _Logistic:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS in
    torch (the objective of scikit-learn's default LogisticRegression: mean cross-entropy plus
    ||W||^2 / (2 n)), in torch so that it runs in seconds on 60,000 x 512 features, on the GPU
    when the trainer runs there."""

    def __init__(self, max_iter: int = 100, device=None):  # scikit-learn's default too
        self.max_iter = max_iter
        self.device = device

    def fit(self, x, y):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.device)
        self.classes_, yi = np.unique(np.asarray(y), return_inverse=True)
        y = torch.as_tensor(yi, device=x.device)
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-12)
        z = (x - self.mean) / self.std
        n, k = z.shape[0], len(self.classes_)
        self.w = torch.zeros(z.shape[1], k, device=x.device)
        self.b = torch.zeros(k, device=x.device)
        onehot = F.one_hot(y, k).to(z.dtype)
        opt = torch.optim.LBFGS(
            [self.w, self.b],
            max_iter=self.max_iter,
            tolerance_grad=1e-6,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            # gradients by hand: (g^T z)^T is several times faster than autograd's z^T g for
            # n x 512 features and a handful of classes on BLAS libraries tuned for square shapes
            logits = z @ self.w + self.b
            loss = F.cross_entropy(logits, y) + self.w.square().sum() / (2 * n)
            g = (torch.softmax(logits, dim=1) - onehot) / n
            self.w.grad = ((g.T @ z).T + self.w / n).contiguous()
            self.b.grad = g.sum(0)
            return loss

        if k > 1:
            opt.step(closure)
        return self

    @torch.no_grad()
    def predict(self, x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.w.device)
        scores = ((x - self.mean) / self.std) @ self.w + self.b
        return self.classes_[scores.argmax(1).cpu().numpy()]


def linear_probe(train_x, train_y, test_x, test_y, seed: int = 0, device=None) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features."""
    torch.manual_seed(seed)
    clf = _Logistic(device=device).fit(train_x, train_y)
    return float((clf.predict(test_x) == np.asarray(test_y)).mean())


def clp(
    train_x, train_sup, train_orig, test_x, test_sup, test_orig, *, embedding: str = "tsne", seed: int = 0, device=None
):
    """(CLP test accuracy on the original labels, embeddings {super-class: (2-D points, original labels)}).

    ``*_sup`` are the training labels (super-classes), ``*_orig`` the original labels; only the
    number of original classes inside each super-class (from the train split) is used to cluster.
    The accuracy is taken over the test samples of the super-classes that hold more than one
    original class (a super-class of one original class has nothing to discover: its samples
    would score 100% whatever the features); None when no super-class holds more than one, as
    with fine labels, where every training class is part of one original class.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding: expected one of {EMBEDDINGS}, got {embedding!r}")
    pseudo = np.full(train_x.shape[0], -1, dtype=np.int64)
    groups = {}  # super-class -> (first pseudo-label, number of clusters)
    pictures = {}
    next_label = 0
    for s in np.unique(train_sup):
        rows = np.flatnonzero(train_sup == s)
        k = len(np.unique(train_orig[rows]))
        z = embed(train_x[rows], embedding, seed)
        pseudo[rows] = next_label + kmeans(z, k, seed)
        groups[int(s)] = (next_label, k)
        pictures[int(s)] = (z if z.shape[1] == 2 else embed(train_x[rows], "pca", seed), train_orig[rows])
        next_label += k
    if all(k == 1 for _, k in groups.values()):
        return None, pictures
    predicted = _Logistic(device=device).fit(train_x, pseudo).predict(test_x)
    correct = scored = 0
    for s, (first, k) in groups.items():
        rows = np.flatnonzero(test_sup == s)
        if rows.size == 0 or k == 1:
            continue
        scored += rows.size
        originals = np.unique(np.concatenate([train_orig[train_sup == s], test_orig[rows]]))
        # confusion between the super-class's clusters and its original classes, on its test rows
        conf = np.zeros((k, originals.size))
        for cluster in range(k):
            hit = predicted[rows] == first + cluster
            for j, o in enumerate(originals):
                conf[cluster, j] = np.sum(hit & (test_orig[rows] == o))
        r, c = linear_sum_assignment(conf, maximize=True)
        correct += conf[r, c].sum()
    return float(correct / max(1, scored)), pictures
