/** A map of at most `capacity` entries that forgets the least recently used first. */
export class Lru<K, V> {
  private readonly map = new Map<K, V>();

  constructor(private readonly capacity: number) {}

  /** The value for `key`, made by `make()` when it is not kept (or no longer). */
  get(key: K, make: () => V): V {
    let value = this.map.get(key);
    if (value !== undefined) {
      this.map.delete(key); // to the back: the most recently used
    } else {
      value = make();
      if (this.map.size >= this.capacity) this.map.delete(this.map.keys().next().value!);
    }
    this.map.set(key, value);
    return value;
  }
}
