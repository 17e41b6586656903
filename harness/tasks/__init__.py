"""Tasks with a known reward: a generator of texts and an exact ground-truth reward r(x, y)."""

from harness.tasks import controlled

# name -> module with generate_reviews(n, seed), reward(prompt, continuation), bradley_terry_pairs
TASKS = {"controlled": controlled}
