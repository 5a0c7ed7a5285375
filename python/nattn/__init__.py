"""nattn (package under construction)."""
