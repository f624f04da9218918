"""seeder package."""
