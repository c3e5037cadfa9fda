"""A small but real ML pipeline: make data, split it, fit logistic regression, evaluate.

conveyor pipeline run examples/quickstart.py:training_pipeline
"""

from __future__ import annotations

import numpy as np

from conveyor import pipeline, step


@step
def make_dataset(n_samples: int = 1000, n_features: int = 5, seed: int = 0) -> np.ndarray:
    """Two Gaussian blobs; the last column is the 0/1 label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_samples)
    centers = np.where(labels[:, None] == 1, 1.0, -1.0)
    features = rng.normal(loc=centers, scale=1.5, size=(n_samples, n_features))
    return np.column_stack([features, labels]).astype(np.float64)


@step
def split(
    data: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle, then split into train and test rows."""
    order = np.random.default_rng(seed).permutation(len(data))
    cut = int(len(data) * (1 - test_fraction))
    return data[order[:cut]], data[order[cut:]]


@step
def train(train_rows: np.ndarray, epochs: int = 300, learning_rate: float = 0.1) -> np.ndarray:
    """Logistic regression by gradient descent; returns the weights (bias last)."""
    x = np.column_stack([train_rows[:, :-1], np.ones(len(train_rows))])
    y = train_rows[:, -1]
    weights = np.zeros(x.shape[1])
    for _ in range(epochs):
        predictions = 1.0 / (1.0 + np.exp(-x @ weights))
        weights -= learning_rate * x.T @ (predictions - y) / len(y)
    return weights


@step
def evaluate(weights: np.ndarray, test_rows: np.ndarray) -> dict[str, float]:
    """Accuracy and log loss on the held-out rows."""
    x = np.column_stack([test_rows[:, :-1], np.ones(len(test_rows))])
    y = test_rows[:, -1]
    p = np.clip(1.0 / (1.0 + np.exp(-x @ weights)), 1e-9, 1 - 1e-9)
    accuracy = float(np.mean((p > 0.5) == y))
    log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"accuracy": accuracy, "log_loss": log_loss}


@pipeline
def training_pipeline(n_samples: int = 1000, epochs: int = 300) -> None:
    data = make_dataset(n_samples=n_samples)
    train_rows, test_rows = split(data)
    weights = train(train_rows, epochs=epochs)
    evaluate(weights, test_rows)


if __name__ == "__main__":
    run = training_pipeline()
    print(run.status.value, run.load("evaluate"))
