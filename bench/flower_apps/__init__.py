"""Flower apps that ``bench/flower_baseline.py`` ships as a FAB: Flower's own FedAvg (Message API)
and Flower's own SecAgg+ (legacy API), with clients that do no training (they send the model
back plus a little noise), so a run measures pure federation overhead."""
