import * as lib from "@huggingface/tokenizers";

/**
 * The parts of @huggingface/tokenizers that decima uses, typed. Its 0.2 .d.ts files import each other
 * without file extensions, which NodeNext resolution can't follow, so TypeScript sees its classes as `any`
 * (or not at all). The runtime exports are fine; this gives them their documented signatures.
 */
export interface HfTokenizer {
  encode(text: string, options?: { add_special_tokens?: boolean }): { ids: number[] };
  decode(ids: number[], options?: { skip_special_tokens?: boolean; clean_up_tokenization_spaces?: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_added_tokens_decoder(): Map<number, { content: string; special: boolean }>;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
}

interface PreTokenizer {
  pre_tokenize(text: string): string[];
}

const untyped = lib as unknown as {
  Tokenizer: new (tokenizerJson: object, tokenizerConfig: object) => HfTokenizer;
  SequencePreTokenizer: new (config: object) => PreTokenizer;
};

export const HfTokenizer = untyped.Tokenizer;
export const SequencePreTokenizer = untyped.SequencePreTokenizer;
