"""ProcessDistro."""
