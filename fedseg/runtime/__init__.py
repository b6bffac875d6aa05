"""Process supervision and Flower plumbing shared by the CLIs."""
