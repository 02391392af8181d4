"""What an accuracy matrix says about a continual run (no torch: reports and `tunelab runs` read it).

R[i][j]: the score (0-1, the task's selection score) on experience j's evaluation data after training on
experiences 0..i; None where not evaluated (j > i: that experience's head is not trained yet).

- average: mean_j R[T-1][j], the final model over every experience (Lopez-Paz & Ranzato, 2017: ACC).
- backward transfer: mean_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting (BWT).
- forgetting: mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j]), the drop from each experience's best
  (Chaudhry et al., 2018).
- forward transfer: mean_{j>0} (R[j][j] - b[j]), where b[j] is experience j trained alone from the
  start model with the same settings (continual.reference): what the earlier experiences did for the
  next one. None without references.
- newest: R[T-1][T-1], how well the last experience was learnt.
"""


def transfer(matrix: list[list[float | None]], reference: list[float | None] | None = None) -> dict:
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError("the accuracy matrix must be square: one row and one column per experience")
    last = matrix[-1]
    if any(v is None for v in last) or any(matrix[j][j] is None for j in range(t)):
        raise ValueError("the final row and the diagonal must be filled")
    out = {"average": sum(last) / t, "newest": last[-1], "backward_transfer": None, "forgetting": None,
           "forward_transfer": None}
    if t > 1:
        out["backward_transfer"] = sum(last[j] - matrix[j][j] for j in range(t - 1)) / (t - 1)
        out["forgetting"] = sum(max(matrix[l][j] for l in range(j, t - 1) if matrix[l][j] is not None) - last[j]
                                for j in range(t - 1)) / (t - 1)
    if reference is not None and t > 1 and all(reference[j] is not None for j in range(1, t)):
        out["forward_transfer"] = sum(matrix[j][j] - reference[j] for j in range(1, t)) / (t - 1)
    return out
