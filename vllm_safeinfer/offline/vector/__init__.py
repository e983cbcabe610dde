"""The safety vector's builder: demonstrations, head ranking and the refusal direction."""
