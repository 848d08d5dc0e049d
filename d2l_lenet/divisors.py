"""The largest divisor of a number up to a bound: block sizes that cut a whole into equal parts."""


def largest_divisor(n: int, at_most: int) -> int:
  """The largest ``d <= at_most`` that divides ``n`` (positive ints; 1 if ``at_most < 2``)."""
  return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)
