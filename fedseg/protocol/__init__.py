"""Wire protocol shared by server and sites (imports neither)."""
